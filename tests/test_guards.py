"""Guards against careless flags: nothing finished is overwritten, no resume mixes two recipes, bad numbers stop
before any compute."""

import dataclasses
import json

import pytest
import torch
from test_inference import random_artifact

import backbone.train as train_module
from backbone.data import load_dataset
from backbone.errors import ProjectError
from backbone.train import TrainConfig, train_backbone
from experiments import evaluate, train_policy
from experiments import train_backbone as train_backbone_cli
from policy.artifact import save_policy


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_a_finished_checkpoint_is_not_trained_over_without_force(tiny_config, digits, tmp_path):
    recipe = TrainConfig(epochs=1, batch_size=512, warmup_epochs=0.1, eval_limit=32)
    train_backbone(tiny_config, recipe, digits, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ProjectError, match="already holds a finished checkpoint; pass --force"):
        train_backbone(tiny_config, recipe, digits, tmp_path)
    assert snapshot(tmp_path) == before
    train_backbone(tiny_config, dataclasses.replace(recipe, seed=1), digits, tmp_path, force=True)
    assert snapshot(tmp_path)["model.safetensors"] != before["model.safetensors"]


def test_resume_with_another_recipe_or_architecture_is_refused(tiny_config, digits, tmp_path, monkeypatch):
    recipe = TrainConfig(epochs=2, batch_size=512, warmup_epochs=0.1, eval_limit=32)
    real_eval, calls = train_module.grid_accuracy, []

    def killed_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train_module, "grid_accuracy", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_backbone(tiny_config, recipe, digits, tmp_path)
    monkeypatch.setattr(train_module, "grid_accuracy", real_eval)
    state = (tmp_path / "train_state.pt").read_bytes()
    with pytest.raises(ProjectError, match=r"other settings \(recipe.lr\); pass --fresh"):
        train_backbone(tiny_config, dataclasses.replace(recipe, lr=1e-4), digits, tmp_path)
    with pytest.raises(ProjectError, match="architecture.embed_dim"):
        train_backbone(dataclasses.replace(tiny_config, embed_dim=32), recipe, digits, tmp_path)
    assert (tmp_path / "train_state.pt").read_bytes() == state, "a refused resume changes nothing"
    train_backbone(tiny_config, dataclasses.replace(recipe, eval_limit=16), digits, tmp_path)  # a run-only change
    assert (tmp_path / "model.safetensors").is_file()


def test_a_state_written_before_a_recipe_field_existed_resumes_at_its_default(tiny_config, tmp_path):
    recipe = TrainConfig(epochs=2)
    settings = json.loads(train_module.resume_settings(tiny_config, recipe))
    del settings["recipe"]["distill_skip_rows"]  # as a state written before the field was added
    state = {"settings": json.dumps(settings)}
    train_module.check_resumable(state, tiny_config, recipe, tmp_path)  # the default: the same run
    with pytest.raises(ProjectError, match=r"other settings \(recipe.distill_skip_rows\)"):
        train_module.check_resumable(state, tiny_config, dataclasses.replace(recipe, distill_skip_rows=1), tmp_path)
    with pytest.raises(ProjectError, match="recipe.epochs"):
        train_module.check_resumable(state, tiny_config, dataclasses.replace(recipe, epochs=3), tmp_path)


@pytest.mark.parametrize("flags", [["--lr", "-1"], ["--eval-limit", "0"], ["--epochs", "0"], ["--label-smoothing", "1"],
                                   ["--threads", "0"]])
def test_bad_training_numbers_stop_before_any_compute(flags, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "train_backbone", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(train_backbone_cli, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as exit_info:
        train_backbone_cli.main(["--out", str(tmp_path / "x"), *flags])
    assert exit_info.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_on_a_machine_without_it_stops_before_any_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(train_backbone_cli, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(ProjectError, match="CUDA is not available; use --device cpu"):
        train_backbone_cli.main(["--out", str(tmp_path / "x"), "--device", "cuda"])


@pytest.mark.parametrize("flags", [["--timesteps", "0"], ["--delta", "1.5"], ["--lam-range", "0.5,0.1"],
                                   ["--tolerance-pp", "-1"], ["--net-arch", "0"]])
def test_bad_policy_numbers_stop_before_any_compute(flags, tmp_path, monkeypatch):
    from policy import job as pipeline

    monkeypatch.setattr(pipeline, "job_dataset", lambda *a, **k: pytest.fail("dataset read"))

    monkeypatch.setattr(pipeline, "load_tables", lambda *a, **k: pytest.fail("tables built"))
    with pytest.raises(SystemExit) as exit_info:
        train_policy.main(["--out", str(tmp_path / "p"), *flags])
    assert exit_info.value.code == 2


def test_a_policy_is_not_replaced_without_force_but_the_default_output_is(tmp_path, tiny_config, monkeypatch, capsys):
    from policy import job as pipeline

    save_policy(random_artifact(tiny_config, "a" * 64), tmp_path / "mine")
    before = snapshot(tmp_path / "mine")
    monkeypatch.setattr(pipeline, "job_dataset", lambda *a, **k: pytest.fail("dataset read"))
    monkeypatch.setattr(pipeline, "load_tables", lambda *a, **k: pytest.fail("tables built"))
    with pytest.raises(ProjectError, match="already holds a policy; pass --force"):
        train_policy.main(["--out", str(tmp_path / "mine")])
    assert snapshot(tmp_path / "mine") == before
    # the default output is the job's own: a second run says it replaces it, and goes on
    monkeypatch.chdir(tmp_path)
    save_policy(random_artifact(tiny_config, "a" * 64), tmp_path / "runs" / "digits" / "policy")
    # the job goes on to its work: reading the dataset, then its tables
    monkeypatch.setattr(pipeline, "job_dataset", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("tables")))
    monkeypatch.setattr(pipeline, "load_tables", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("tables")))
    with pytest.raises(RuntimeError, match="tables"):
        train_policy.main([])
    assert "replacing the policy in runs/digits/policy" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_report_paths_that_are_artifacts_are_refused_before_any_work(flag, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_policy", lambda *a, **k: pytest.fail("work started"))
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"weights")
    with pytest.raises(ProjectError, match="would overwrite an artifact"):
        evaluate.main([flag, str(target)])
    assert target.read_bytes() == b"weights"
