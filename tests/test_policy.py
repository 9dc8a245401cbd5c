import json

import numpy as np
import pytest
import torch

from backbone.checkpoint import backbone_hash
from policy.artifact import PolicyArtifactError, load_policy


def test_train_policy_end_to_end(tiny_run):
    root, summary = tiny_run
    on_disk = json.loads((root / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("dataset", "n_test", "reference_accuracy", "policy_accuracy", "delta_pp", "reference_gflops",
                "policy_gflops", "flop_reduction", "lambda", "calibration_delta_pp"):
        assert key in on_disk, key
    assert on_disk["dataset"] == "digits" and on_disk["n_test"] == 270
    assert on_disk["delta_pp"] == pytest.approx(100 * (on_disk["policy_accuracy"] - on_disk["reference_accuracy"]))
    assert on_disk["flop_reduction"] == pytest.approx(1 - on_disk["policy_gflops"] / on_disk["reference_gflops"])
    assert 0.01 <= on_disk["lambda"] <= 1.0  # the price the rule picked for the conditioned policy
    assert on_disk["selection"] == {"mode": "point_estimate", "tolerance_pp": 0.1, "margin_pp": 0.1,
                                    "statistic": "accuracy drop", "procedure": "fixed_sequence"}
    assert on_disk["saved_to"] == str(root / "policy") and "p_below_tolerance" in on_disk
    # the certified claim comes from the artifact's operating points: 154 calibration images cannot certify 0.1%
    assert on_disk["certified"]["certified"] is False and "needs at least 2302" in on_disk["certified"]["reason"]
    points = json.loads((root / "policy" / "policy.json").read_text())["operating_points"]
    assert points["labels_read"] is False and len(points["points"]) == 61
    assert (root / "policy" / "policy.safetensors").is_file() and (root / "policy" / "policy.json").is_file()
    assert list((root / "tb").rglob("events.out.tfevents*")), "TensorBoard logs written"
    assert len(list((root / "cache").glob("*.npz"))) == 3, "one cached table per split"


def test_artifact_roundtrip_gives_same_actions(tiny_run):
    root, _ = tiny_run
    artifact = load_policy(root / "policy", backbone_hash(root / "backbone"))
    again = load_policy(root / "policy")
    assert artifact.lam_range == (0.01, 1.0)
    features = np.random.default_rng(0).normal(size=(64, artifact.feature_mean.shape[0] - 1)).astype(np.float32)
    assert np.array_equal(artifact.act(features), again.act(features))
    assert np.array_equal(artifact.act(features, lam=0.02), again.act(features, lam=0.02))
    meta = json.loads((root / "policy" / "policy.json").read_text())
    for key in ("action_space", "token_grans", "depths", "ffn_widths", "features", "lam", "backbone_hash"):
        assert key in meta
    assert artifact.network_flops() > 0


def test_policy_for_another_backbone_is_refused(tiny_run):
    root, _ = tiny_run
    with pytest.raises(PolicyArtifactError, match="trained for backbone"):
        load_policy(root / "policy", backbone_hash="0" * 64)


def test_corrupt_artifact_is_refused(tiny_run, tmp_path):
    root, _ = tiny_run
    for name in ("policy.json", "policy.safetensors"):
        (tmp_path / name).write_bytes((root / "policy" / name).read_bytes())
    (tmp_path / "policy.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PolicyArtifactError, match="unreadable"):
        load_policy(tmp_path)


def test_act_is_stable_baselines3_deterministic_action(tiny_run):
    root, _ = tiny_run
    artifact = load_policy(root / "policy")
    rng = np.random.default_rng(1)
    features = rng.normal(size=(4096, artifact.feature_mean.shape[0] - 1)).astype(np.float32) * 3
    for lam in (0.01, 0.1, 1.0):
        column = np.full((len(features), 1), artifact.price.column(lam), np.float32)
        obs = artifact.normalize(torch.as_tensor(np.concatenate([features, column], axis=1)))
        with torch.inference_mode():
            expected = artifact.policy._predict(obs, deterministic=True).numpy()
        assert np.array_equal(artifact.act(features, lam=lam), expected)


def test_a_folder_where_the_summary_goes_is_refused_before_anything_changes(tiny_run, tmp_path):
    import shutil

    from backbone.errors import ProjectError
    from experiments import train_policy

    root, _ = tiny_run
    out = tmp_path / "policy"
    shutil.copytree(root / "policy", out)
    (out / "summary.json").unlink()
    (out / "summary.json").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ProjectError, match="summary.json is a folder"):
        train_policy.main(["--backbone", str(root / "backbone"), "--out", str(out), "--force", "--timesteps", "2048",
                           "--quiet", "--cache-dir", str(root / "cache"), "--log-dir", str(tmp_path / "tb")])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, "nothing replaced"
    # the summary, written in the same unit as the policy, names the policy's own price
    meta = json.loads((root / "policy" / "policy.json").read_text())
    assert json.loads((root / "policy" / "summary.json").read_text())["lambda"] == meta["lam"]


def test_the_training_job_never_reads_test_and_the_main_job_reads_it_once(tmp_path, monkeypatch):
    from conftest import save_tiny_backbone

    from evaluation.pipeline import run_policy_job
    from policy import job as job_module
    from policy.train import PolicyTrainConfig

    read = []
    real = job_module.cached_outcome_table

    def spy(model, digest, split, *args, **kwargs):
        read.append(split)
        return real(model, digest, split, *args, **kwargs)

    monkeypatch.setattr(job_module, "cached_outcome_table", spy)
    save_tiny_backbone(tmp_path / "backbone")
    job = job_module.PolicyJob(backbone=str(tmp_path / "backbone"), out=str(tmp_path / "policy"), quiet=True,
                               cache_dir=str(tmp_path / "cache"), log_dir=str(tmp_path / "tb"),
                               train=PolicyTrainConfig(total_timesteps=1024))
    trained = job_module.train_policy_job(job)
    assert read == ["policy_train", "calibration"] and set(trained.tables) == {"policy_train", "calibration"}
    assert not (tmp_path / "policy" / "policy.json").exists(), "the training job saves nothing of the chosen policy"
    read.clear()
    summary = run_policy_job(job)
    assert read.count("test") == 1 and summary["n_test"] == 270
    assert (tmp_path / "policy" / "summary.json").is_file()


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_the_learning_rate_schedule_is_the_one_ppo_steps_with(schedule, monkeypatch):
    """Four rollouts of 128 steps: PPO's optimizer steps at 3e-4 throughout (constant), or at 3e-4 times the
    progress remaining after each rollout, 0.75 / 0.5 / 0.25 / 0 (linear)."""
    from conftest import synthetic_table

    from policy import train as policy_train

    steps = []

    class RecordingPPO(policy_train.PPO):
        def train(self) -> None:
            super().train()
            steps.append(self.policy.optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(policy_train, "PPO", RecordingPPO)
    table = synthetic_table(np.random.default_rng(0).random((64, 2, 2, 2)) < 0.8)
    config = policy_train.PolicyTrainConfig(lam_range=(0.01, 1.0), total_timesteps=512, num_envs=16, n_steps=8,
                                            batch_size=64, n_epochs=1, lr_schedule=schedule, quiet=True)
    policy_train.train_one(table, config.prices[0], config, policy_train.feature_scaler(table.features), None, {})
    expected = [3e-4] * 4 if schedule == "constant" else [3e-4 * p for p in (0.75, 0.5, 0.25, 0.0)]
    assert steps == pytest.approx(expected, abs=1e-12)


def test_an_unknown_learning_rate_schedule_is_refused():
    from policy.train import PolicyTrainConfig

    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        PolicyTrainConfig(lr_schedule="cosine")
