import numpy as np
import pytest
import torch

from backbone import AdaPerceiver
from backbone.checkpoint import load_checkpoint, save_checkpoint
from backbone.compare import compare_backbones, format_comparison
from backbone.data import load_dataset
from experiments import compare_backbones as compare_cli


def random_checkpoints(config, root, seeds, dataset="digits"):
    dirs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = AdaPerceiver(config)
        with torch.no_grad():  # spread the logits so that the checkpoints disagree image by image
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        dirs.append(save_checkpoint(model, root / f"s{seed}", {"dataset": dataset, "split_seed": 0}))
    return dirs


def test_compare_matches_direct_scoring(tiny_config, tmp_path):
    data = load_dataset("digits")
    joint = random_checkpoints(tiny_config, tmp_path / "joint", [0, 1])
    reference = random_checkpoints(tiny_config, tmp_path / "ref", [2, 3, 4])
    result = compare_backbones({"joint": joint, "reference": reference}, data, split_seed=0)

    held_out = {name: [] for name in ("joint", "reference")}
    for name, dirs in (("joint", joint), ("reference", reference)):
        for run, directory in zip(result["groups"][name]["runs"], dirs):
            model = load_checkpoint(directory)
            correct = []
            for split in ("policy_train", "calibration", "test"):
                s = data.splits[split]
                with torch.no_grad():
                    hit = (model(s.x).argmax(-1) == s.y).numpy()
                assert run[split] == pytest.approx(hit.mean())
                correct.append(hit)
            held_out[name].append(np.concatenate(correct))
            assert run["pooled"] == pytest.approx(held_out[name][-1].mean())
        accs = [h.mean() for h in held_out[name]]
        assert result["groups"][name]["mean"]["pooled"] == pytest.approx(np.mean(accs))
        assert result["groups"][name]["sd"]["pooled"] == pytest.approx(np.std(accs, ddof=1))
    delta = 100 * (np.mean(held_out["joint"], 0) - np.mean(held_out["reference"], 0)).mean()
    d = result["difference"]
    assert d["pooled_delta_pp"] == pytest.approx(delta)
    assert d["pooled_delta_pp_ci"][0] <= delta <= d["pooled_delta_pp_ci"][1]
    assert d["pooled_delta_pp_ci"][0] < d["pooled_delta_pp_ci"][1]
    assert "joint − reference" in format_comparison(result)

    only_test = compare_backbones({"joint": joint[:1]}, data, split_seed=0, splits=("test",))
    assert only_test["groups"]["joint"]["runs"][0]["pooled"] == pytest.approx(result["groups"]["joint"]["runs"][0]["test"])
    with pytest.raises(ValueError, match="unknown splits"):
        compare_backbones({"joint": joint}, data, split_seed=0, splits=("train",))


def test_compare_rejects_other_dataset_or_split_seed(tiny_config, tmp_path):
    data = load_dataset("digits")
    good = random_checkpoints(tiny_config, tmp_path / "a", [0])
    other = random_checkpoints(tiny_config, tmp_path / "b", [1], dataset="fashion-mnist")
    with pytest.raises(ValueError, match="split seed"):
        compare_backbones({"joint": good, "reference": other}, data, split_seed=0)
    with pytest.raises(ValueError, match="split seed"):
        compare_backbones({"joint": good, "reference": good}, data, split_seed=1)


def test_compare_cli_writes_json_and_markdown(tiny_config, tmp_path):
    joint = random_checkpoints(tiny_config, tmp_path / "j", [0])
    reference = random_checkpoints(tiny_config, tmp_path / "r", [1])
    result = compare_cli.main(["--joint", str(joint[0]), "--reference", str(reference[0]),
                               "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md")])
    assert (tmp_path / "c.json").is_file()
    assert "pooled" in (tmp_path / "c.md").read_text()
    assert set(result["groups"]) == {"joint", "reference"}
