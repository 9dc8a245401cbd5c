"""Damaged or odd inputs end in the project's own error, naming the file and the fix; CLIs end with one line."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backbone import checkpoint
from backbone.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from backbone.data import DataError, load_dataset
from backbone.errors import ProjectError, run_cli
from backbone.train import TrainConfig, train_backbone
from envs import FeatureSpec
from inference.inputs import load_images
from policy.artifact import PolicyArtifact, PolicyArtifactError, load_policy, make_policy, save_policy

ROOT = Path(__file__).resolve().parents[1]


def test_project_errors_share_a_base_that_is_a_value_error():
    for error in (DataError, CheckpointError, PolicyArtifactError):
        assert issubclass(error, ProjectError) and issubclass(error, ValueError)


# ---- .npz: datasets (load_dataset) and inference inputs (load_images) ------------------------------------------

def _good_npz_bytes(tmp_path: Path) -> bytes:
    np.savez(tmp_path / "good.npz", x=np.zeros((40, 8, 8), np.uint8), y=np.repeat(np.arange(4), 10))
    return (tmp_path / "good.npz").read_bytes()


def _random_bytes(path, tmp_path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())


def _empty_file(path, tmp_path):
    path.write_bytes(b"")


def _npy_renamed(path, tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((10, 8, 8), np.uint8))
    (tmp_path / "plain.npy").rename(path)


def _a_pickle(path, tmp_path):
    path.write_bytes(pickle.dumps({"x": np.zeros((10, 8, 8), np.uint8)}))


def _truncated(path, tmp_path):
    path.write_bytes(_good_npz_bytes(tmp_path)[:-40])


def _truncated_half(path, tmp_path):
    raw = _good_npz_bytes(tmp_path)
    path.write_bytes(raw[: len(raw) // 2])


NOT_AN_NPZ = {"random_bytes": _random_bytes, "empty_file": _empty_file, "npy_renamed": _npy_renamed,
              "a_pickle": _a_pickle, "truncated": _truncated, "truncated_half": _truncated_half}


def _load_dataset(path, config):
    return load_dataset(str(path))


LOADERS = {"load_dataset": _load_dataset, "load_images": load_images}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", NOT_AN_NPZ)
def test_files_that_are_not_a_readable_npz(tmp_path, tiny_config, loader, case):
    path = tmp_path / f"{case}.npz"
    NOT_AN_NPZ[case](path, tmp_path)
    with pytest.raises(DataError, match=f"{case}.npz") as caught:
        LOADERS[loader](path, tiny_config)
    message = str(caught.value)
    assert "\n" not in message and "np.savez" in message, message  # one line, with the fix
    assert "pickle" not in message.replace(str(path), "").lower(), "a file that is not an npz is not 'pickled data'"


@pytest.mark.parametrize("loader", LOADERS)
def test_object_arrays_are_refused_by_name(tmp_path, tiny_config, loader):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([np.zeros((8, 8)), None], dtype=object), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"objects\.npz.*'x'.*dtype object"):
        LOADERS[loader](path, tiny_config)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_empty_arrays_are_refused(tmp_path, tiny_config, loader, dtype):
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 8, 8), dtype), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match=r"empty\.npz.*empty"):
        LOADERS[loader](path, tiny_config)


@pytest.mark.parametrize("present, absent", [("x_test", "y_test"), ("y_test", "x_test")])
def test_half_a_test_set_is_refused(tmp_path, present, absent):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, (200, 8, 8), dtype=np.uint8), "y": np.repeat(np.arange(4), 50),
              "x_test": rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), "y_test": np.repeat(np.arange(4), 5)}
    del arrays[absent]
    np.savez(tmp_path / "half.npz", **arrays)
    with pytest.raises(DataError, match=rf"half\.npz: has '{present}' but no '{absent}'"):
        load_dataset(str(tmp_path / "half.npz"))


@pytest.mark.parametrize("counts", [[50, 50, 1], [3, 3], [1]], ids=["one-rare-class", "tiny", "one-image"])
def test_too_few_images_per_class(tmp_path, counts):
    y = np.repeat(np.arange(len(counts)), counts)
    np.savez(tmp_path / "few.npz", x=np.zeros((len(y), 8, 8), np.uint8), y=y)
    with pytest.raises(DataError, match=r"few\.npz: too few images per class.*at least \d+ images"):
        load_dataset(str(tmp_path / "few.npz"))


def test_a_complete_test_set_still_works(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "full.npz", x=rng.integers(0, 256, (200, 8, 8), dtype=np.uint8), y=np.repeat(np.arange(4), 50),
             x_test=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y_test=np.repeat(np.arange(4), 5))
    data = load_dataset(str(tmp_path / "full.npz"))
    assert len(data.splits["test"]) == 20 and data.num_classes == 4


# ---- checkpoint: shapes from the safetensors header, before any model is allocated ------------------------------

def _rewrite_weights(directory: Path, tensors: dict) -> None:
    """Replace the weights of a checkpoint, keeping a recorded digest (if any) consistent with them."""
    save_file(tensors, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    if "weights_sha256" in config:
        config["weights_sha256"] = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
        (directory / "config.json").write_text(json.dumps(config))


def test_absurd_embed_dim_is_refused_before_allocating(tiny_model, tmp_path, monkeypatch):
    save_checkpoint(tiny_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"]["embed_dim"] = 100_000
    (tmp_path / "config.json").write_text(json.dumps(config))
    real = checkpoint.AdaPerceiver

    def only_on_meta(model_config):
        assert torch.empty(0).device.type == "meta", "a model was allocated before the weights' shapes were checked"
        return real(model_config)

    monkeypatch.setattr(checkpoint, "AdaPerceiver", only_on_meta)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match .*config\.json.*100000"):
        load_checkpoint(tmp_path)


def test_missing_weights_are_named(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["head.weight"]
    _rewrite_weights(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match.*missing \['head\.weight'\]"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("text", ["[]", '{"architecture": 3}', '"text"'])
def test_a_config_that_is_not_an_object_is_refused(tiny_model, tmp_path, text):
    save_checkpoint(tiny_model, tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json: not a valid checkpoint config"):
        load_checkpoint(tmp_path)


# ---- policy artifact: missing keys, a zero feature_std ---------------------------------------------------------

def _artifact(config, std=None) -> PolicyArtifact:
    spec = FeatureSpec()
    n = spec.dim(config)
    torch.manual_seed(0)
    policy = make_policy(n, [len(config.token_grans), config.depth, len(config.ffn_widths)], [8])
    meta = {"token_grans": list(config.token_grans), "depths": list(range(1, config.depth + 1)),
            "ffn_widths": list(config.ffn_widths), "features": spec.to_dict(), "lam": 0.1, "backbone_hash": "0" * 64,
            "net_arch": [8]}
    return PolicyArtifact(policy, np.zeros(n, np.float32), np.ones(n, np.float32) if std is None else std, meta)


def test_a_sound_artifact_loads(tiny_config, tmp_path):
    save_policy(_artifact(tiny_config), tmp_path)
    loaded = load_policy(tmp_path)
    assert loaded.feature_std.min() == 1 and loaded.meta["net_arch"] == [8]


@pytest.mark.parametrize("key", ["token_grans", "depths", "ffn_widths", "features", "net_arch", "lam"])
def test_policy_json_without_a_key(tiny_config, tmp_path, key):
    save_policy(_artifact(tiny_config), tmp_path)
    meta = json.loads((tmp_path / "policy.json").read_text())
    del meta[key]
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyArtifactError, match=rf"policy\.json: missing \['{key}'\].*train_policy\.py"):
        load_policy(tmp_path)


def test_policy_json_with_a_bad_feature_spec(tiny_config, tmp_path):
    save_policy(_artifact(tiny_config), tmp_path)
    meta = json.loads((tmp_path / "policy.json").read_text())
    meta["features"] = {"no_such_option": True}
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyArtifactError, match=r"policy\.json: features .* not a feature spec"):
        load_policy(tmp_path)


@pytest.mark.parametrize("key", ["feature_std", "feature_mean"])
def test_policy_weights_without_the_scaler(tiny_config, tmp_path, key):
    save_policy(_artifact(tiny_config), tmp_path)
    tensors = load_file(tmp_path / "policy.safetensors")
    del tensors[key]
    save_file(tensors, tmp_path / "policy.safetensors")
    meta = json.loads((tmp_path / "policy.json").read_text())
    if "weights_sha256" in meta:  # keep a recorded digest consistent, so the scaler check itself is exercised
        meta["weights_sha256"] = hashlib.sha256((tmp_path / "policy.safetensors").read_bytes()).hexdigest()
        (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyArtifactError, match=rf"policy\.safetensors: missing tensors \['{key}'\]"):
        load_policy(tmp_path)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_feature_std_must_be_finite_and_positive(tiny_config, tmp_path, bad):
    n = FeatureSpec().dim(tiny_config)
    std = np.ones(n, np.float32)
    std[1] = bad
    save_policy(_artifact(tiny_config, std), tmp_path)
    with pytest.raises(PolicyArtifactError, match=r"policy\.safetensors: feature_std must be finite and > 0"):
        load_policy(tmp_path)


# ---- resume state: weights_only, and the project's error for a corrupt or crafted file -------------------------

def _record_execution(path: str) -> None:
    Path(path).write_text("code in train_state.pt was executed")


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return _record_execution, (str(self.marker),)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _crafted(path: Path, marker: Path) -> None:
    torch.save({"model": _RunsCodeWhenUnpickled(marker), "epoch": 1}, path)


def _random(path: Path, marker: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())


def _half(path: Path, marker: Path) -> None:
    torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 1}, path)
    path.write_bytes(path.read_bytes()[:300])


def _not_a_state(path: Path, marker: Path) -> None:
    torch.save([torch.zeros(3), 1], path)


@pytest.mark.parametrize("make", [_crafted, _random, _half, _not_a_state], ids=["crafted", "random", "truncated", "list"])
def test_a_corrupt_or_crafted_train_state_is_refused(tiny_config, digits, tmp_path, make):
    out, marker = tmp_path / "run", tmp_path / "executed"
    out.mkdir()
    make(out / "train_state.pt", marker)
    with pytest.raises(ProjectError, match=r"train_state\.pt is (corrupt or )?not a training state.*delete it") as caught:
        train_backbone(tiny_config, TrainConfig(epochs=1, device="cpu", eval_limit=8), digits, out)
    assert "weights_only" not in str(caught.value)
    assert not marker.exists(), "nothing in the file may run"
    assert not (out / "model.safetensors").exists()


# ---- CLIs: one line and status 2 for the user's problems; a traceback only with --debug ---------------------------

def test_run_cli_prints_one_line_and_exits_2(monkeypatch, capsys):
    def main():
        raise DataError("data.npz: something is wrong\nover two lines; fix it")

    monkeypatch.setattr(sys, "argv", ["script.py", "--flag"])
    monkeypatch.delenv("ADAPERCEIVER_DEBUG", raising=False)
    with pytest.raises(SystemExit) as caught:
        run_cli(main)
    assert caught.value.code == 2
    assert capsys.readouterr().err == "error: data.npz: something is wrong over two lines; fix it\n"

    def missing():
        Path("/no/such/file/anywhere").read_text()

    with pytest.raises(SystemExit):
        run_cli(missing)
    assert capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory")


def test_run_cli_debug_flag_and_environment_keep_the_traceback(monkeypatch):
    seen = []

    def main(argv=None):
        seen.append(list(sys.argv))
        raise CheckpointError("config.json not found")

    monkeypatch.setattr(sys, "argv", ["script.py", "--backbone", "x", "--debug"])
    monkeypatch.delenv("ADAPERCEIVER_DEBUG", raising=False)
    with pytest.raises(CheckpointError):
        run_cli(main)
    assert seen[-1] == ["script.py", "--backbone", "x"], "--debug is taken out before main parses the arguments"
    monkeypatch.setattr(sys, "argv", ["script.py"])
    monkeypatch.setenv("ADAPERCEIVER_DEBUG", "1")
    with pytest.raises(CheckpointError):
        run_cli(main)


def test_run_cli_leaves_bugs_alone(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["script.py"])
    monkeypatch.delenv("ADAPERCEIVER_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0)


def test_every_script_ends_with_run_cli():
    for script in sorted((ROOT / "experiments").glob("*.py")):
        if script.name != "__init__.py":
            assert script.read_text().rstrip().endswith("run_cli(main)"), script.name


def _infer(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = ["--backbone", str(tmp_path / "no-backbone"), "--policy", str(tmp_path / "no-policy"),
            "--input", str(tmp_path / "none.npz"), *extra]
    env = {**{k: v for k, v in os.environ.items() if k != "ADAPERCEIVER_DEBUG"}, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "experiments/infer.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
def test_cli_error_is_one_line_with_status_2(tmp_path):
    done = _infer(tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-backbone" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_cli_debug_shows_the_traceback(tmp_path, how):
    done = _infer(tmp_path, "--debug") if how == "flag" else _infer(tmp_path, env={"ADAPERCEIVER_DEBUG": "1"})
    assert done.returncode != 0 and done.returncode != 2
    assert "Traceback" in done.stderr and "CheckpointError" in done.stderr, done.stderr


# ---- round two: what a careless user still found ------------------------------------------------------------

def test_a_16_bit_png_is_read_at_its_full_depth_not_clipped(tmp_path, tiny_config):
    from PIL import Image

    from inference.inputs import load_images

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    (tmp_path / "eight").mkdir()
    (tmp_path / "sixteen").mkdir()
    for i, pixels in enumerate(grey):
        Image.fromarray(pixels, "L").save(tmp_path / "eight" / f"{i}.png")
        Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "sixteen" / f"{i}.png")  # 16-bit grey
    assert Image.open(tmp_path / "sixteen" / "0.png").mode.startswith("I")
    eight, _, _ = load_images(tmp_path / "eight", tiny_config)
    sixteen, _, _ = load_images(tmp_path / "sixteen", tiny_config)
    assert torch.allclose(sixteen, eight, atol=1 / 255 + 1e-6), "the same pixels at either depth"
    assert len(torch.unique(sixteen)) > 2, "not clipped to 0 and 1"


def test_a_latency_table_with_true_for_milliseconds_is_refused():
    from policy.latency_table import LatencyTableError, check_table_arrays

    table = {"token_grans": [2, 4], "depths": [1], "ffn_widths": [1.0], "staged_ms": [[[1.0]], [[2.0]]],
             "fresh_ms": [[[1.0]], [[2.0]]], "full_ms": 2.0, "batch_size": 1}
    check_table_arrays(table)  # sound
    for key, value in (("full_ms", True), ("staged_ms", [[[True]], [[2.0]]]), ("fresh_ms", [[[1.0]], [[False]]])):
        with pytest.raises(LatencyTableError, match=f"{key} holds true/false"):
            check_table_arrays({**table, key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_infer_on_cuda_without_cuda_is_refused_before_loading(monkeypatch, tmp_path):
    from experiments import infer
    from inference.classifier import AdaptiveClassifier

    monkeypatch.setattr(AdaptiveClassifier, "from_dirs", lambda *a, **k: pytest.fail("loaded before the device check"))
    with pytest.raises(ProjectError, match="CUDA is not available"):
        infer.main(["--backbone", "checkpoints/digits", "--policy", "policies/digits", "--input", str(tmp_path / "x.npz"),
                    "--device", "cuda"])


def test_a_dataset_that_is_not_the_backbones_is_one_clear_error(tmp_path):
    from experiments import train_policy

    with pytest.raises(ProjectError, match="trained on 'digits', not 'fashion-mnist'"):
        train_policy.main(["--dataset", "fashion-mnist", "--backbone", "checkpoints/digits", "--out", str(tmp_path / "p"),
                           "--quiet"])
    assert not (tmp_path / "p").exists()


def test_a_glance_off_the_grid_is_refused_before_any_table_is_built(tmp_path, capsys):
    from experiments import train_policy

    cache = tmp_path / "cache"
    with pytest.raises(ProjectError, match=r"glance \(4, 9, 0.25\) is not a configuration.*depths 1\.\.4"):
        train_policy.main(["--glance", "4,9,0.25", "--out", str(tmp_path / "p"), "--cache-dir", str(cache), "--quiet"])
    assert not (tmp_path / "p").exists() and not cache.exists()
    with pytest.raises(SystemExit) as exit_:
        train_policy.main(["--glance", "4,2", "--out", str(tmp_path / "p")])
    assert exit_.value.code == 2 and "TOKENS,DEPTH,WIDTH such as 4,2,0.25" in capsys.readouterr().err


def test_a_latency_batch_larger_than_the_images_is_one_clear_error(tmp_path):
    from experiments import measure_latency

    with pytest.raises(ProjectError, match="--batch-size 100000 is larger than the 270 test images"):
        measure_latency.main(["--batch-size", "100000", "--out", str(tmp_path / "l.json"), "--quiet"])
    assert not (tmp_path / "l.json").exists()


def test_a_latency_glance_off_the_grid_is_refused_before_the_images_are_read(tmp_path, monkeypatch):
    from backbone.config import ConfigError
    from experiments import measure_latency

    def no_read(job):
        raise AssertionError("the images were read before the glance was checked")

    monkeypatch.setattr(measure_latency, "job_dataset", no_read)
    with pytest.raises(ConfigError, match=r"glance \(3, 1, 0.25\) is not a configuration of this backbone"):
        measure_latency.main(["--glance", "3,1,0.25", "--out", str(tmp_path / "l.json"), "--quiet"])
    assert not (tmp_path / "l.json").exists()


@pytest.mark.parametrize("shape", [(4, 10, 10), (4, 3, 8, 8), (4, 8, 8, 1)], ids=["size", "channels", "channels-last"])
def test_images_of_another_shape_are_one_clear_error(tmp_path, tiny_config, shape):
    np.savez(tmp_path / "odd.npz", x=np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=r"odd.npz: images are .*this backbone takes 1x8x8; resize them"):
        load_images(tmp_path / "odd.npz", tiny_config)


def test_the_backbone_and_classifier_refuse_odd_images_with_a_project_error(tiny_model):
    from backbone.config import ConfigError
    from backbone.model import ImageError

    with pytest.raises(ImageError, match=r"images must have shape \(B, 1, 8, 8\) for this backbone"):
        tiny_model.embed(torch.zeros(2, 1, 10, 10))
    with pytest.raises(ConfigError, match="tokens=3 is not a token granularity"):
        tiny_model.resolve(3, None, None)
    for error in (ImageError, ConfigError):
        assert issubclass(error, ProjectError), "the scripts print a ProjectError as one line"


def _fake_compiler(tmp_path: Path) -> Path:
    """A g++ that answers --version (so inductor picks it) and fails every build."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "g++"
    script.write_text('#!/bin/sh\n[ "$1" = "--version" ] && { echo "g++ 12"; exit 0; }\necho "g++: broken" >&2; exit 1\n')
    script.chmod(0o755)
    return folder


def _digits_npz(tmp_path: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "d.npz", x=(digits.images[:8] / 16).astype(np.float32))
    return tmp_path / "d.npz"


def _infer_aot(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    args = ["--backbone", "checkpoints/digits", "--policy", "policies/digits", "--input", str(_digits_npz(tmp_path)),
            "--path", "aot", "--batch-size", "4", "--json", str(tmp_path / "out.json")]
    env = {**{k: v for k, v in os.environ.items() if k != "ADAPERCEIVER_DEBUG"}, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "experiments/infer.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
def test_a_compiler_that_fails_is_one_line_naming_the_fix(tmp_path):
    cache = tmp_path / "inductor"
    done = _infer_aot(tmp_path, {"PATH": f"{_fake_compiler(tmp_path)}:{os.environ['PATH']}",
                                 "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "the aot path could not build a program" in errors[0] and "apt-get install g++" in errors[0]
    assert f"rm -rf {cache}" in errors[0] and "eager path" in errors[0]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="the aot path needs a C++ compiler (apt-get install g++)")
def test_a_damaged_inductor_cache_is_one_line_naming_the_cache(tmp_path):
    # a probe compiled once fills the cache; its sources overwritten with garbage, the same probe fails to build
    probe = ("import torch\nfrom inference.paths import compile_kernel\nx = torch.randn(3, 4)\n"
             "print(compile_kernel('aot', lambda x: (x @ x.T).relu(), (x,), ('batch',))(x).shape)\n")
    cache = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    run = lambda: subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=600, check=False)
    first = run()
    assert first.returncode == 0 and "torch.Size([3, 3])" in first.stdout, first.stderr[-2000:]
    sources = [p for p in cache.rglob("*") if p.suffix in (".cpp", ".json")]
    assert sources, "the probe left its sources in the cache"
    for path in sources:
        path.write_text("garbage\n")
    second = run()
    assert second.returncode != 0
    assert "InferencePathError" in second.stderr and f"rm -rf {cache}" in second.stderr, second.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="the aot path needs a C++ compiler (apt-get install g++)")
def test_aot_on_a_cpu_says_nothing_of_cuda_and_reports_images_per_s_without_compiling(tmp_path):
    fake_cuda = tmp_path / "cuda"
    (fake_cuda / "bin").mkdir(parents=True)  # a toolkit without a GPU: inductor's builder warned of it
    done = _infer_aot(tmp_path, {"CUDA_HOME": str(fake_cuda), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CUDA" not in done.stderr, done.stderr[-2000:]
    totals = json.loads((tmp_path / "out.json").read_text())["totals"]
    wall, compile_s, per_s = totals["wall_s"], totals["compile_s"], totals["images_per_s"]
    assert 0 < compile_s < wall, "compiling is part of the wall time"
    assert per_s == pytest.approx(8 / (wall - compile_s), rel=1e-3), "images/s leave the compile time out"


def test_develop_refuses_an_empty_price_grid_before_reading_anything(tmp_path, capsys):
    from experiments import develop

    with pytest.raises(SystemExit) as exit_:
        develop.main(["--policy", str(tmp_path / "absent"), "--prices", "0"])
    assert exit_.value.code == 2 and "error: argument --prices: must be >= 1, got 0" in capsys.readouterr().err
