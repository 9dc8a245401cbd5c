"""torchrun with two CPU processes (gloo) reproduces one process, and writes one set of outputs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backbone import AdaPerceiver
from backbone.checkpoint import read_config, save_checkpoint
from envs import load_table

pytestmark = pytest.mark.slow  # each test starts Python processes (torchrun)

ROOT = Path(__file__).resolve().parents[1]
# a linear patch embedding: BatchNorm statistics are per rank on CPU, so a conv stem breaks exactness
TINY = ["--embed-dim", "16", "--depth", "2", "--num-heads", "2", "--token-grans", "2,4,8,16", "--stem-channels", ""]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run([*launcher, *args], check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # 1145 training images, global batch 160: 8 steps, the last one uneven across ranks
    common = ["experiments/train_backbone.py", *TINY, "--epochs", "1", "--batch-size", "160", "--warmup-epochs", "0.5",
              "--device", "cpu", "--threads", "1"]
    run([*common, "--out", str(root / "single")])
    run([*common, "--out", str(root / "double")], nproc=2)
    return root


def test_two_processes_match_one(trained):
    single = load_file(trained / "single" / "model.safetensors")
    double = load_file(trained / "double" / "model.safetensors")
    assert single.keys() == double.keys()
    for key in single:
        assert torch.allclose(single[key], double[key], atol=2e-5, rtol=1e-4), key
    # and training really moved the weights away from the seeded initialisation
    torch.manual_seed(0)
    fresh = AdaPerceiver(read_config(trained / "single")[0]).state_dict()
    assert max((fresh[k] - single[k]).abs().max().item() for k in single) > 1e-3


def test_two_processes_write_one_checkpoint_and_one_log(trained):
    out = trained / "double"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "grid_accuracy.json", "model.safetensors", "tb",
                                                     "train_state.pt"]
    assert len(list((out / "tb").glob("events.out.tfevents*"))) == 1


def test_conv_stem_on_cpu_ranks_warns_that_batchnorm_is_per_rank(tmp_path):
    done = run(["experiments/train_backbone.py", *TINY, "--stem-channels", "4", "--epochs", "1", "--batch-size", "320",
                "--device", "cpu", "--threads", "1", "--eval-limit", "50", "--out", str(tmp_path)], nproc=2)
    assert "BatchNorm statistics are per rank" in done.stderr
    assert read_config(tmp_path)[0].stem_channels == (4,)


def test_sharded_outcome_table_equals_single_process(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "backbone", {"dataset": "digits", "split_seed": 0})
    common = ["experiments/build_tables.py", "--backbone", str(tmp_path / "backbone"), "--splits", "calibration,test",
              "--device", "cpu"]
    run([*common, "--cache-dir", str(tmp_path / "one")])
    run([*common, "--cache-dir", str(tmp_path / "two")], nproc=2)
    for split in ("calibration", "test"):
        (one,) = (tmp_path / "one").glob(f"{split}-*.npz")
        (two,) = (tmp_path / "two").glob(f"{split}-*.npz")
        assert one.name == two.name, "same cache key"
        a, b = load_table(one), load_table(two)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.correct, b.correct)
        assert np.allclose(a.true_logprob, b.true_logprob, atol=1e-5)
        assert np.allclose(a.features, b.features, atol=1e-5)
        assert a.meta == b.meta
    # the ranks' shards were merged into the cached files and removed
    assert list((tmp_path / "two" / "shards").iterdir()) == []
