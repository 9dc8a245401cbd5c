import json

import numpy as np
import pytest
import torch
from PIL import Image

from backbone import flops
from backbone.checkpoint import backbone_hash, save_checkpoint
from backbone.data import load_dataset
from envs import FeatureSpec, compute_features, feature_flops
from experiments import infer
from policy import AdaptiveClassifier, PolicyArtifact, PolicyArtifactError, save_policy
from policy.artifact import make_policy
from policy.benchmark import benchmark_inference


@pytest.fixture(scope="module")
def digits_images():
    split = load_dataset("digits").splits["test"]
    return split.x[:64], split.y[:64]


def random_artifact(config, digest: str, seed: int = 0, scaler=None) -> PolicyArtifact:
    """A policy with random weights whose actions vary across inputs (no PPO needed)."""
    torch.manual_seed(seed)
    spec = FeatureSpec()
    n = spec.dim(config)
    policy = make_policy(n, [len(config.token_grans), config.depth, len(config.ffn_widths)], [16])
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(3 * torch.randn_like(p))
    meta = {"token_grans": list(config.token_grans), "depths": list(range(1, config.depth + 1)),
            "ffn_widths": list(config.ffn_widths), "features": spec.to_dict(), "lam": 0.1, "backbone_hash": digest,
            "net_arch": [16], "feature_flops": feature_flops(spec, config)}
    mean, std = scaler if scaler is not None else (np.zeros(n, np.float32), np.ones(n, np.float32))
    return PolicyArtifact(policy, mean, std, meta)


@pytest.fixture
def dirs(tmp_path, tiny_model, digits_images):
    save_checkpoint(tiny_model, tmp_path / "backbone", {"dataset": "digits", "split_seed": 0})
    # standardise with the real features so the random weights see varied inputs
    features = compute_features(tiny_model, tiny_model.embed(digits_images[0]), FeatureSpec()).numpy()
    scaler = (features.mean(0), features.std(0) + 1e-6)
    artifact = random_artifact(tiny_model.config, backbone_hash(tmp_path / "backbone"), scaler=scaler)
    save_policy(artifact, tmp_path / "policy")
    return tmp_path / "backbone", tmp_path / "policy"


def test_adaptive_equals_each_image_alone(dirs, digits_images):
    classifier = AdaptiveClassifier.from_dirs(*dirs)
    x, _ = digits_images
    out = classifier.predict(x)
    assert len(set(out.configs)) >= 3, "the random policy should mix configurations"
    with torch.no_grad():
        for i in range(len(x)):
            alone = classifier.backbone(x[i : i + 1], *out.configs[i])
            assert (alone[0] - out.logits[i]).abs().max().item() <= 1e-5
    assert torch.equal(out.classes, out.logits.argmax(-1))


def test_order_is_preserved_for_shuffled_batches(dirs, digits_images):
    classifier = AdaptiveClassifier.from_dirs(*dirs)
    x, _ = digits_images
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    a, b = classifier.predict(x), classifier.predict(x[perm])
    assert torch.allclose(a.logits[perm], b.logits, atol=1e-5)
    assert [a.configs[i] for i in perm.tolist()] == b.configs


def test_batch_is_grouped_by_configuration(dirs, digits_images, monkeypatch):
    classifier = AdaptiveClassifier.from_dirs(*dirs)
    x, _ = digits_images
    chosen = classifier.choose(classifier.backbone.embed(x))
    calls = []
    real_run = classifier.backbone.run
    monkeypatch.setattr(classifier.backbone, "run", lambda tokens, *cfg: calls.append((len(tokens), cfg)) or real_run(tokens, *cfg))
    classifier.predict(x)
    distinct = set(chosen)
    glance = classifier.artifact.feature_spec.glance_config(classifier.backbone.config)
    assert calls[0] == (len(x), glance), "first the policy's glance over the whole batch"
    calls = calls[1:]
    assert len(distinct) >= 3 and len(calls) == len(distinct), "then one run per distinct configuration"
    for size, cfg in calls:
        assert size == chosen.count(tuple(cfg)), "each group holds exactly the inputs that chose it"


def test_flops_per_image_and_fixed_override(dirs, digits_images):
    classifier = AdaptiveClassifier.from_dirs(*dirs)
    x, _ = digits_images
    c = classifier.backbone.config
    out = classifier.predict(x)
    overhead = classifier.artifact.meta["feature_flops"] + classifier.artifact.network_flops()
    assert overhead > 0
    assert np.allclose(out.flops, [flops(c, *cfg) + overhead for cfg in out.configs])
    fixed = classifier.predict(x, config=(4, 2, 0.5))
    assert set(fixed.configs) == {(4, 2, 0.5)}
    assert np.allclose(fixed.flops, flops(c, 4, 2, 0.5))


def test_errors(dirs, tiny_model, tmp_path, digits_images):
    backbone_dir, policy_dir = dirs
    classifier = AdaptiveClassifier.from_dirs(backbone_dir, policy_dir)
    with pytest.raises(ValueError, match="images must have shape"):
        classifier.predict(torch.rand(2, 1, 9, 9))
    bad = digits_images[0][:2].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        classifier.predict(bad)
    with pytest.raises(ValueError, match="allowed"):
        classifier.predict(digits_images[0][:2], config=(3, 1, 1.0))
    # a policy for another backbone
    save_policy(random_artifact(tiny_model.config, "f" * 64), tmp_path / "other")
    with pytest.raises(PolicyArtifactError, match="trained for backbone"):
        AdaptiveClassifier.from_dirs(backbone_dir, tmp_path / "other")
    # a policy whose grid is not the backbone's
    artifact = random_artifact(tiny_model.config, "f" * 64)
    artifact.meta["ffn_widths"] = [0.5, 1.0]
    with pytest.raises(ValueError, match="ffn_widths"):
        AdaptiveClassifier(tiny_model, artifact)


def test_infer_cli_on_npz_and_png_folder(dirs, digits_images, tmp_path, capsys):
    backbone_dir, policy_dir = dirs
    x, y = digits_images
    np.savez(tmp_path / "in.npz", x=(x[:10, 0].numpy() * 255).astype(np.uint8), y=y[:10].numpy())
    result = infer.main(["--backbone", str(backbone_dir), "--policy", str(policy_dir), "--input", str(tmp_path / "in.npz"),
                         "--json", str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    assert printed.count("config (") == 10 and "images_per_s" in printed
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["totals"]["images"] == 10 and 0 <= saved["totals"]["accuracy"] <= 1
    assert saved == json.loads(json.dumps(result))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)).resize((32, 32)).save(folder / f"img{i}.png")
    result = infer.main(["--backbone", str(backbone_dir), "--policy", str(policy_dir), "--input", str(folder)])
    assert [r["name"] for r in result["images"]] == ["img0.png", "img1.png", "img2.png"]


def test_benchmark_reports_every_key(dirs, digits_images):
    classifier = AdaptiveClassifier.from_dirs(*dirs)
    result = benchmark_inference(classifier, digits_images[0], batch_size=16, min_seconds=0.05)
    for key in ("full_images_per_s", "adaptive_images_per_s", "naive_images_per_s", "flop_speedup",
                "realized_speedup", "efficiency"):
        assert result[key] > 0, key
