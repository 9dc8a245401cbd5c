"""Every artifact is one unit: a kill between its files, or a file changed since, is refused on load."""

import os
import stat

import pytest
import torch
from test_inference import random_artifact

from backbone import AdaPerceiver
from backbone.checkpoint import CheckpointError, backbone_hash, load_checkpoint, save_checkpoint
from backbone.io import check_output_path, write_json
from policy.artifact import PolicyArtifactError, load_policy, save_policy


class Killed(BaseException):
    """Stands in for SIGKILL between two renames (not an Exception: nothing may catch it)."""


def kill_after_first_rename(monkeypatch):
    real = os.replace
    calls = []

    def replace(src, dst):
        if calls:
            raise Killed
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_checkpoint_killed_between_its_files_is_refused(tmp_path, tiny_config, monkeypatch):
    torch.manual_seed(0)
    save_checkpoint(AdaPerceiver(tiny_config), tmp_path, {"dataset": "digits"})
    kill_after_first_rename(monkeypatch)
    with pytest.raises(Killed):
        save_checkpoint(AdaPerceiver(tiny_config), tmp_path, {"dataset": "digits"})  # new weights, old config
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="interrupted write"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="interrupted write"):
        backbone_hash(tmp_path)  # nothing downstream (tables, policies) is keyed on a mixed checkpoint


def test_checkpoint_weights_altered_in_place_are_refused(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # one weight becomes inf, the file still parses
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since"):
        load_checkpoint(tmp_path)


def test_policy_killed_between_its_files_is_refused(tmp_path, tiny_config, monkeypatch):
    save_policy(random_artifact(tiny_config, "a" * 64, seed=0), tmp_path)
    kill_after_first_rename(monkeypatch)
    with pytest.raises(Killed):
        save_policy(random_artifact(tiny_config, "b" * 64, seed=1), tmp_path)
    monkeypatch.undo()
    with pytest.raises(PolicyArtifactError, match="interrupted write"):
        load_policy(tmp_path)


def test_stale_temporary_files_are_removed_and_files_get_the_umask(tmp_path, tiny_config):
    stale = tmp_path / ".policy.json.x1y2.tmp"
    stale.write_text("left by a killed write")
    old = os.umask(0o022)
    try:
        save_policy(random_artifact(tiny_config, "a" * 64), tmp_path)
        write_json(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(old)
    assert not stale.exists()
    for name in ("policy.json", "policy.safetensors", "report.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_policy(tmp_path).meta["backbone_hash"] == "a" * 64


def test_report_paths_that_are_artifacts_are_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    for path in ("model.safetensors", "ckpt/config.json", "policies/x/policy.json", "table.npz", "ckpt"):
        with pytest.raises(ValueError, match="--json"):
            check_output_path(tmp_path / path, "--json")
    check_output_path(tmp_path / "report.json", "--json")  # a plain report file is fine
