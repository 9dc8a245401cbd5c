"""Image-folder datasets: tiny folders of PNGs of mixed sizes written here, streamed through every script; each bad
folder is one error line naming the file, exit 2, and nothing already written changes."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbone import AdaPerceiver, AdaPerceiverConfig
from backbone.checkpoint import read_config
from backbone.data import SPLIT_NAMES, DataError, SplitConfig
from backbone.errors import run_cli
from backbone.folders import (
    SPLITS_FILE,
    FolderSpec,
    ImageFiles,
    check_files,
    image_batches,
    load_folder,
    mode_note,
    recorded_splits,
    scan_folder,
)
from envs import FeatureSpec, build_outcome_table, load_table
from experiments import build_tables, calibrate, compare_backbones, evaluate, infer, train_backbone, train_policy
from inference.inputs import _read_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("blue", "green", "red", "white", "yellow")
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "white": (220, 220, 220),
           "yellow": (210, 210, 30)}
# a 16 px RGB model small enough to train an epoch in a second or two; linear patches (no BatchNorm)
TINY = ["--image-size", "16", "--channels", "3", "--patch-size", "4", "--embed-dim", "16", "--depth", "2",
        "--num-heads", "2", "--token-grans", "2,4", "--stem-channels", "", "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def write_folder(root: Path, per_class: int = 40, classes=CLASSES, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: RGB images of mixed sizes (10..40 px a side), a class's colour plus noise."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(10, 41, 2))
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` by path, with its sha256: what 'nothing already written changes' compares."""
    files = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def cli(main, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run a script's main as its command line does (``run_cli``): the exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["script", *argv])
    capsys.readouterr()
    try:
        run_cli(lambda: main(argv))
        status = 0
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one line a refused command printed (progress bars aside)."""
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "image/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder of 200 images (5 classes) and a backbone trained on it for one epoch, in this process."""
    root = tmp_path_factory.mktemp("folders")
    folder = write_folder(root / "shapes")
    backbone = root / "backbone"
    train_backbone.main(["--dataset", str(folder), *TINY, "--epochs", "1", "--batch-size", "32", "--workers", "1",
                         "--out", str(backbone)])
    return folder, backbone


# ---- the dataset: splits, pixels, streaming ------------------------------------------------------------------------


def test_splits_are_disjoint_stratified_seeded_and_cover_the_folder(tmp_path):
    folder = write_folder(tmp_path / "f")
    spec = FolderSpec(16, 3, workers=0)
    data = load_folder(folder, spec, SplitConfig(seed=0))
    files = [set(data.splits[name].x.files) for name in SPLIT_NAMES]
    assert sum(len(f) for f in files) == len(set().union(*files)) == 200
    for name in SPLIT_NAMES:
        split = data.splits[name]
        assert len(split.y) == len(split.x)
        assert set(split.y.tolist()) == set(range(5)), name  # every class in every split
        # a file's label is its class folder's place among the sorted class names
        assert all(CLASSES[label] == Path(f).parts[0] for f, label in zip(split.x.files, split.y.tolist(), strict=True))
    again, other = load_folder(folder, spec, SplitConfig(seed=0)), load_folder(folder, spec, SplitConfig(seed=1))
    assert again.splits["test"].x.files == data.splits["test"].x.files
    assert other.splits["test"].x.files != data.splits["test"].x.files
    # the record reproduces the same splits, and reading it back lists what was cut
    replay = load_folder(folder, spec, record=data.record)
    assert all(replay.splits[n].x.files == data.splits[n].x.files for n in SPLIT_NAMES)
    assert data.classes == list(CLASSES) and data.num_classes == 5 and data.image_shape == (3, 16, 16)


def test_train_and_test_subfolders_make_the_test_split(tmp_path):
    write_folder(tmp_path / "f" / "train", per_class=30)
    write_folder(tmp_path / "f" / "test", per_class=4, seed=1)
    data = load_folder(tmp_path / "f", FolderSpec(16, 3, 0), SplitConfig())
    assert sorted(data.splits["test"].x.files) == sorted(str(Path("test", c, f"{i:03d}.png"))
                                                         for c in CLASSES for i in range(4))
    pool = {f for n in SPLIT_NAMES[:3] for f in data.splits[n].x.files}
    assert len(pool) == 150 and all(f.startswith("train") for f in pool)


def test_pixels_are_those_the_inference_reader_and_the_server_see(tmp_path):
    """A folder-trained backbone must see the same pixels from infer.py's flat-folder reader and serving."""
    folder = write_folder(tmp_path / "f", per_class=2)
    config = AdaPerceiverConfig(img_size=16, in_chans=3, patch_size=4, embed_dim=16, num_heads=2, depth=2,
                                token_grans=(2, 4), num_classes=5)
    images = ImageFiles(folder, ["red/000.png", "blue/001.png"], FolderSpec(16, 3, 0))
    for i, name in enumerate(images.files):
        expected = torch.from_numpy(_read_image(folder / name, config).astype(np.float32) / 255)
        assert images[i].shape == (3, 16, 16)
        assert torch.allclose(images[i], expected, atol=1e-6)
    assert images[0][0].mean() > images[0][2].mean()  # red really is red: channels in RGB order
    grey = ImageFiles(folder, images.files, FolderSpec(16, 1, 0))
    expected = _read_image(folder / "red/000.png", dataclasses.replace(config, in_chans=1)).astype(np.float32) / 255
    assert grey[0].shape == (1, 16, 16) and torch.allclose(grey[0], torch.from_numpy(expected), atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_stream_in_the_order_asked(tmp_path, workers):
    folder = write_folder(tmp_path / "f", per_class=1)
    images = ImageFiles(folder, [f"{c}/000.png" for c in CLASSES], FolderSpec(16, 3, workers))
    one_by_one = torch.stack([images[i] for i in range(len(images))])
    assert torch.equal(torch.cat(list(image_batches(images, 3))), one_by_one)
    order = torch.tensor([4, 0, 2, 1, 3])
    assert torch.equal(torch.cat(list(image_batches(images, 2, order))), one_by_one[order])
    # and a tensor is batched the same way (the in-memory path of every consumer)
    assert torch.equal(torch.cat(list(image_batches(one_by_one, 2, order))), one_by_one[order])


def test_a_streamed_table_is_the_in_memory_one(tmp_path):
    """The outcome table of image files, read batch by batch, equals the one of the same images held in memory."""
    folder = write_folder(tmp_path / "f", per_class=6)
    images = ImageFiles(folder, sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")), FolderSpec(16, 3, 1))
    torch.manual_seed(0)
    model = AdaPerceiver(AdaPerceiverConfig(img_size=16, in_chans=3, patch_size=4, embed_dim=16, num_heads=2, depth=2,
                                            token_grans=(2, 4), num_classes=5)).eval()
    labels = torch.arange(len(images)) % 5
    streamed = build_outcome_table(model, images, labels, FeatureSpec(), batch_size=7)
    in_memory = build_outcome_table(model, torch.stack([images[i] for i in range(len(images))]), labels, FeatureSpec(),
                                    batch_size=7)
    for key in ("features", "predicted", "true_logprob", "confidence", "labels"):
        assert np.array_equal(getattr(streamed, key), getattr(in_memory, key)), key


# ---- bad folders, in the library -----------------------------------------------------------------------------------


def test_bad_layouts_name_the_folder(tmp_path):
    spec = FolderSpec(16, 3, 0)
    empty_class = write_folder(tmp_path / "a", per_class=10)
    (empty_class / "zebra").mkdir()
    (empty_class / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"a/zebra: class folder holds no image files"):
        scan_folder(empty_class)
    one = write_folder(tmp_path / "b", per_class=10, classes=("red",))
    with pytest.raises(DataError, match=r"one class folder only \(red\); a classifier needs at least two"):
        load_folder(one, spec)
    flat = tmp_path / "c"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    with pytest.raises(DataError, match=r"no class folders \(it holds 1 images directly"):
        load_folder(flat, spec)
    half = write_folder(tmp_path / "d" / "train", per_class=10)
    with pytest.raises(DataError, match=r"has train/ but no test/"):
        load_folder(half.parent, spec)
    write_folder(tmp_path / "d" / "test", per_class=2, classes=CLASSES[:4])
    with pytest.raises(DataError, match=r"d/test has no folder for class 'yellow'"):
        load_folder(half.parent, spec)
    few = write_folder(tmp_path / "e", per_class=3)
    with pytest.raises(DataError, match=r"too few images per class"):
        load_folder(few, spec)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_file_is_one_data_error_naming_it_even_from_a_worker(tmp_path, workers):
    folder = write_folder(tmp_path / "f", per_class=10)
    bad = folder / "green" / "004.png"
    bad.write_bytes(bad.read_bytes()[:60])
    images = ImageFiles(folder, sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")),
                        FolderSpec(16, 3, workers))
    for attempt in (lambda: check_files(images, progress=False), lambda: list(image_batches(images, 8))):
        with pytest.raises(DataError) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(f"{bad}: not a readable image") and "remove it or save it again" in message
        assert "Traceback" not in message and "worker" not in message and "\n" not in message


def test_mixed_modes_are_converted_and_said_so_and_an_unconvertible_one_is_refused(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "f", per_class=4)
    Image.open(folder / "red" / "000.png").convert("P").save(folder / "red" / "000.png")
    Image.open(folder / "red" / "001.png").convert("RGBA").save(folder / "red" / "001.png")
    Image.open(folder / "blue" / "000.png").convert("L").save(folder / "blue" / "000.png")
    spec = FolderSpec(16, 3, 0)
    images = ImageFiles(folder, sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")), spec)
    counts = check_files(images, progress=False)
    assert counts == {"RGB": 17, "P": 1, "RGBA": 1, "L": 1}
    note = mode_note(folder, counts, spec)
    assert note == (f"note: {folder}: images in modes L (1), P (1), RGB (17), RGBA (1); every one converted to RGB "
                    "(alpha dropped, palettes expanded)")
    assert mode_note(folder, {"RGB": 20}, spec) is None
    grey = images.files.index("blue/000.png")
    assert images[grey].shape == (3, 16, 16) and torch.equal(images[grey][0], images[grey][1])  # grey -> equal RGB
    # Pillow converts every mode it reads from files (a LAB TIFF included), so a mode without a conversion is
    # simulated: the refusal names the file and its mode
    Image.new("RGB", (12, 12), (10, 20, 30)).convert("LAB").save(folder / "red" / "lab.tif")
    convert = Image.Image.convert

    def no_lab(self, mode=None, *args, **kwargs):
        if self.mode == "LAB":
            raise ValueError("conversion from LAB to RGB not supported")
        return convert(self, mode, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", no_lab)
    lab = ImageFiles(folder, ["blue/000.png", "red/lab.tif"], spec)
    with pytest.raises(DataError, match=r"red/lab.tif: images in mode LAB cannot be converted to RGB"):
        check_files(lab, progress=False)


def test_a_changed_file_list_is_refused_naming_the_file(tmp_path):
    folder = write_folder(tmp_path / "f", per_class=10)
    spec = FolderSpec(16, 3, 0)
    record = load_folder(folder, spec).record
    shutil.copy(folder / "red" / "000.png", folder / "red" / "new.png")
    with pytest.raises(DataError, match=rf"{folder / 'red' / 'new.png'} was added \(1 added, 0 removed, 0 changed"):
        load_folder(folder, spec, record=record, source="bb/splits.json")
    (folder / "red" / "new.png").unlink()
    (folder / "blue" / "003.png").unlink()
    with pytest.raises(DataError, match=rf"recorded in bb/splits.json: {folder / 'blue' / '003.png'} was removed"):
        load_folder(folder, spec, record=record, source="bb/splits.json")
    write_folder(folder, per_class=10, seed=5)  # every file rewritten: other noise, other sizes
    with pytest.raises(DataError, match=r"changed size \(\d+ -> \d+ bytes\)"):
        load_folder(folder, spec, record=record)


# ---- the scripts ---------------------------------------------------------------------------------------------------


def test_the_checkpoint_records_the_splits_and_the_class_names(trained):
    folder, backbone = trained
    config, meta = read_config(backbone)
    assert (config.img_size, config.in_chans, config.num_classes) == (16, 3, 5)
    assert meta["classes"] == list(CLASSES) and meta["splits"]["files"] == 200
    record = recorded_splits(backbone, meta)
    assert record["files_digest"] == scan_folder(folder).digest()
    assert sum(len(record["splits"][n]) for n in SPLIT_NAMES) == 200
    # the recorded file is the one config.json was written with
    original = (backbone / SPLITS_FILE).read_bytes()
    (backbone / SPLITS_FILE).write_bytes(original.replace(b"red/", b"der/", 1))
    try:
        with pytest.raises(DataError, match="not the file .*config.json was written with"):
            recorded_splits(backbone, meta)
    finally:
        (backbone / SPLITS_FILE).write_bytes(original)


@pytest.mark.parametrize("damage", ["empty class", "truncated file", "not an image", "one class"])
def test_train_backbone_refuses_a_bad_folder_with_one_line_and_writes_nothing(trained, tmp_path, damage,
                                                                                monkeypatch, capsys):
    folder = shutil.copytree(trained[0], tmp_path / "photos")
    out = shutil.copytree(trained[1], tmp_path / "backbone")  # an earlier checkpoint --force would replace
    named = {"empty class": folder / "zebra", "truncated file": folder / "red" / "007.png",
             "not an image": folder / "red" / "notes.png", "one class": folder}[damage]
    if damage == "empty class":
        named.mkdir()
    elif damage == "truncated file":
        named.write_bytes(named.read_bytes()[:50])
    elif damage == "not an image":
        named.write_text("a text file with an image's name")
    else:
        for other in CLASSES:
            if other != "red":
                shutil.rmtree(folder / other)
    before = snapshot(folder, out)
    status, err = cli(train_backbone.main, ["--dataset", str(folder), *TINY, "--epochs", "1", "--workers", "2",
                                            "--out", str(out), "--force"], monkeypatch, capsys)
    assert status == 2
    line = error_line(err)
    assert f"error: {named}" in line and ("(red)" in line if damage == "one class" else True)
    assert snapshot(folder, out) == before


def test_train_backbone_converts_mixed_modes_and_says_so(trained, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(trained[0], tmp_path / "photos")
    Image.open(folder / "red" / "000.png").convert("P").save(folder / "red" / "000.png")
    Image.open(folder / "blue" / "000.png").convert("L").save(folder / "blue" / "000.png")
    status, err = cli(train_backbone.main, ["--dataset", str(folder), *TINY, "--epochs", "1", "--workers", "0",
                                            "--out", str(tmp_path / "backbone")], monkeypatch, capsys)
    assert status == 0
    assert f"note: {folder}: images in modes L (1), P (1), RGB (198); every one converted to RGB" in err
    assert (tmp_path / "backbone" / SPLITS_FILE).is_file()


def test_a_finished_checkpoint_is_refused_before_any_file_is_read(trained, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(trained[0], tmp_path / "photos")
    (folder / "red" / "003.png").write_bytes(b"not an image")  # would be refused too, after decoding every file
    status, err = cli(train_backbone.main, ["--dataset", str(folder), *TINY, "--out", str(trained[1])],
                      monkeypatch, capsys)
    assert status == 2 and "already holds a finished checkpoint" in error_line(err) and "checking" not in err


def test_a_resumed_run_refuses_a_folder_whose_file_list_changed(trained, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(trained[0], tmp_path / "photos")
    out = tmp_path / "interrupted"
    out.mkdir()
    shutil.copy(trained[1] / "train_state.pt", out)  # as a run killed after its last epoch leaves it
    argv = ["--dataset", str(folder), *TINY, "--epochs", "1", "--batch-size", "32", "--workers", "0", "--out", str(out)]
    shutil.copy(folder / "red" / "000.png", folder / "red" / "extra.png")
    status, err = cli(train_backbone.main, argv, monkeypatch, capsys)
    assert status == 2 and "other settings (data.files_digest)" in error_line(err)
    (folder / "red" / "extra.png").unlink()
    status, err = cli(train_backbone.main, argv, monkeypatch, capsys)
    assert status == 0 and (out / "config.json").is_file() and (out / SPLITS_FILE).is_file()


def test_later_scripts_refuse_a_folder_whose_file_list_changed(trained, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(trained[0], tmp_path / "photos")
    backbone = trained[1]
    shutil.copy(folder / "red" / "000.png", folder / "red" / "extra.png")
    cache, policy = tmp_path / "cache", tmp_path / "policy"
    before = snapshot(backbone)
    for main, argv in ((build_tables.main, ["--backbone", str(backbone), "--cache-dir", str(cache)]),
                       (train_policy.main, ["--backbone", str(backbone), "--cache-dir", str(cache), "--out", str(policy),
                                            "--timesteps", "64", "--threads", "1", "--log-dir", str(tmp_path / "tb")])):
        status, err = cli(main, ["--dataset", str(folder), "--quiet", *argv], monkeypatch, capsys)
        assert status == 2
        line = error_line(err)
        assert f"{folder / 'red' / 'extra.png'} was added" in line and "train a new backbone" in line
    assert not cache.exists() and not policy.exists() and not (tmp_path / "tb").exists()
    assert snapshot(backbone) == before


def test_compare_backbones_scores_a_folder_on_the_recorded_splits(trained, tmp_path, monkeypatch, capsys):
    from backbone.checkpoint import load_checkpoint

    folder, backbone = trained
    result = compare_backbones.main(["--dataset", str(folder), "--workers", "0", "--joint", str(backbone),
                                     "--reference", str(backbone)])
    record = recorded_splits(backbone, read_config(backbone)[1])
    assert result["splits"] == {s: len(record["splits"][s]) for s in ("policy_train", "calibration", "test")}
    # the test split's accuracy is the model's on the recorded test files, read here on their own
    data = load_folder(folder, FolderSpec(16, 3, 0), record=record)
    model = load_checkpoint(backbone).eval()
    with torch.inference_mode():
        right = torch.cat([model(x).argmax(-1) for x in image_batches(data.splits["test"].x, 7)]) == data.splits["test"].y
    assert result["groups"]["joint"]["runs"][0]["test"] == pytest.approx(right.float().mean().item())
    assert result["difference"]["pooled_delta_pp"] == 0.0
    # a backbone cut from the folder with other splits is refused, in one line
    other = tmp_path / "other"
    train_backbone.main(["--dataset", str(folder), *TINY, "--epochs", "1", "--batch-size", "32", "--workers", "0",
                         "--split-seed", "1", "--out", str(other)])
    status, err = cli(compare_backbones.main, ["--dataset", str(folder), "--workers", "0", "--joint", str(backbone),
                                               "--reference", str(other)], monkeypatch, capsys)
    assert status == 2 and f"{other} was not trained on the splits of this image folder" in error_line(err)


@pytest.mark.slow
def test_the_pipeline_runs_from_a_folder(trained, tmp_path, capsys):
    """train_backbone (the fixture) -> tables in two shards (torchrun) -> train_policy -> evaluate -> calibrate
    -> infer, all from the folder of RGB images of mixed sizes."""
    folder, backbone = trained
    cache = tmp_path / "cache"
    # two processes, each tabulating half of every split, as a multi-GPU run would
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "experiments/build_tables.py", "--dataset", str(folder), "--backbone", str(backbone), "--device", "cpu",
              "--cache-dir", str(cache), "--workers", "1", "--quiet"]
    done = subprocess.run(launch, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = recorded_splits(backbone, read_config(backbone)[1])
    for name in ("policy_train", "calibration", "test"):
        assert f"{name}: {len(record['splits'][name])} inputs" in done.stdout
    sharded = {p.name.split("-")[0]: load_table(p, mmap=True) for p in cache.glob("*.npz")}
    assert set(sharded) == {"policy_train", "calibration", "test"}

    policy = tmp_path / "policy"
    summary = train_policy.main(["--dataset", str(folder), "--backbone", str(backbone), "--out", str(policy),
                                 "--cache-dir", str(cache), "--timesteps", "512", "--threads", "1", "--quiet",
                                 "--log-dir", str(tmp_path / "tb"), "--workers", "0"])
    assert summary["n_test"] == 30 and (policy / "policy.json").is_file()
    # the sharded tables were the ones read: the job's test labels are the recorded test files' classes
    expected = [CLASSES.index(Path(f).parts[0]) for f, _ in record["splits"]["test"]]
    assert sharded["test"].labels.tolist() == expected

    report = evaluate.main(["--dataset", str(folder), "--backbone", str(backbone), "--policy", str(policy),
                            "--cache-dir", str(cache), "--quiet", "--router-seeds", "0", "--workers", "0"])
    assert report["n_test"] == 30

    result = calibrate.main(["--backbone", str(backbone), "--policy", str(policy), "--unlabeled", str(folder),
                             "--tolerance", "60", "--out", str(tmp_path / "calibrated"), "--quiet", "--workers", "0"])
    assert result["n"] == len(record["splits"]["calibration"])  # the backbone's own folder: its calibration split
    capsys.readouterr()
    out = infer.main(["--backbone", str(backbone), "--policy", str(tmp_path / "calibrated"), "--input", str(folder),
                      "--batch-size", "64", "--workers", "2", "--json", str(tmp_path / "infer.json")])
    printed = capsys.readouterr().out
    assert out["totals"]["images"] == 200 and 0 <= out["totals"]["accuracy"] <= 1
    row = out["images"][0]
    assert row["name"] == "blue/000.png" and row["class_name"] == CLASSES[row["class"]]
    assert f"blue/000.png\tclass {row['class']} ({row['class_name']})" in printed
    assert json.loads((tmp_path / "infer.json").read_text())["totals"]["images"] == 200
