"""Jointly trained backbones against full-configuration-only references, over seeds, on held-out images.

One image is 0.37 pp of the digits test split, so a single pair of runs cannot
resolve a 0.5 pp gap. This module scores the full configuration of every
checkpoint on the splits the backbones never trained on (by default; the
backbone-train split can be added to measure fit), averages each group
over its seeds, and puts a paired bootstrap interval (over images) on the
difference between the two groups.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import bootstrap

from backbone.checkpoint import load_checkpoint, read_config
from backbone.data import DataError, Dataset, SplitConfig, load_dataset
from backbone.folders import (
    SPLITS_FILE,
    FolderSpec,
    ImageFiles,
    image_batches,
    is_image_folder,
    load_folder,
    recorded_splits,
)

HELD_OUT_SPLITS = ("policy_train", "calibration", "test")


def comparison_data(dataset: str, data_dir: str | None, split_seed: int, first_checkpoint: str | Path,
                    workers: int = 0) -> Dataset:
    """The dataset the checkpoints are scored on: a named set or ``.npz`` cut with ``split_seed``, or an image folder
    with the splits recorded beside ``first_checkpoint`` (its files streamed; ``check_same_data`` then holds every
    other checkpoint to the same record)."""
    if not is_image_folder(dataset):
        return load_dataset(dataset, data_dir, SplitConfig(seed=split_seed))
    config, meta = read_config(first_checkpoint)
    record = recorded_splits(first_checkpoint, meta)
    if record is None:
        raise DataError(f"{first_checkpoint} was trained on {meta.get('dataset')!r}, not on an image folder; pass its "
                        "--dataset, or checkpoints trained on this folder")
    return load_folder(dataset, FolderSpec(config.img_size, config.in_chans, workers), record=record,
                       source=str(Path(first_checkpoint) / SPLITS_FILE))


@torch.inference_mode()
def full_config_correct(model: torch.nn.Module, images: torch.Tensor | ImageFiles, labels: torch.Tensor,
                        batch_size: int = 512) -> np.ndarray:
    """Whether the full configuration classifies each image right: bool ``(n,)``; ``images`` in memory ``(n, C, H,
    W)`` or image files, read batch by batch."""
    model.eval()
    device = next(model.parameters()).device
    hits = [model(x.to(device)).argmax(-1).cpu() == labels[i * batch_size : (i + 1) * batch_size]
            for i, x in enumerate(image_batches(images, batch_size))]
    return torch.cat(hits).numpy()


def paired_interval_pp(diff: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval, in pp, of the mean of per-image accuracy differences ``diff`` ``(n,)``."""
    if np.all(diff == diff[0]):  # no spread to resample
        return 100 * float(diff[0]), 100 * float(diff[0])
    ci = bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                   random_state=np.random.default_rng(seed)).confidence_interval
    return 100 * float(ci.low), 100 * float(ci.high)


def check_same_data(directories: list[str | Path], data: Dataset, split_seed: int) -> None:
    """Raise ``DataError`` unless every checkpoint was trained on ``data`` cut with ``split_seed`` (an image folder:
    with the file lists of ``data``'s record)."""
    for directory in directories:
        _, meta = read_config(directory)
        if data.record is not None:
            if recorded_splits(directory, meta) != data.record:
                raise DataError(f"{directory} was not trained on the splits of this image folder that "
                                 "the first checkpoint records; compare checkpoints trained on the same splits")
            continue
        name = Path(str(meta.get("dataset", ""))).stem
        if name != data.name or meta.get("split_seed") != split_seed:
            raise DataError(
                f"{directory} was trained on dataset {meta.get('dataset')!r} with split seed "
                f"{meta.get('split_seed')}, not {data.name!r} with split seed {split_seed}; compare checkpoints "
                "of one dataset and one split seed (pass --dataset and --split-seed to match them)"
            )


def compare_backbones(groups: dict[str, list[str | Path]], data: Dataset, split_seed: int,
                      splits: tuple[str, ...] = HELD_OUT_SPLITS, seed: int = 0) -> dict:
    """Full-configuration accuracy of each checkpoint and group on each of ``splits`` and on all of them pooled.

    ``groups`` maps a name to checkpoint directories (one per training seed); the
    first two groups are compared as ``first - second`` in percentage points, with
    a 95% paired bootstrap interval over images of the seed-averaged correctness.
    """
    if len(groups) < 1 or any(not dirs for dirs in groups.values()):
        raise DataError("each group needs at least one checkpoint directory")
    unknown = [s for s in splits if s not in data.splits]
    if unknown or not splits:
        raise DataError(f"unknown splits {unknown}; choose among {sorted(data.splits)}")
    check_same_data([d for dirs in groups.values() for d in dirs], data, split_seed)
    parts = (*splits, "pooled")
    result: dict = {"splits": {s: len(data.splits[s]) for s in splits}, "groups": {}}
    mean_correct = {}
    for name, directories in groups.items():
        runs, per_run = [], []
        for directory in directories:
            model = load_checkpoint(directory)
            correct = {s: full_config_correct(model, data.splits[s].x, data.splits[s].y) for s in splits}
            correct["pooled"] = np.concatenate([correct[s] for s in splits])
            per_run.append(correct["pooled"])
            runs.append({"checkpoint": str(directory), **{s: float(correct[s].mean()) for s in parts}})
        accuracy = np.array([[run[s] for s in parts] for run in runs])
        result["groups"][name] = {
            "runs": runs,
            "mean": dict(zip(parts, accuracy.mean(0).tolist())),
            "sd": dict(zip(parts, accuracy.std(0, ddof=1).tolist() if len(runs) > 1 else [0.0] * len(parts))),
        }
        mean_correct[name] = np.mean(per_run, axis=0)
    if len(groups) >= 2:
        first, second = list(groups)[:2]
        diff = mean_correct[first] - mean_correct[second]
        result["difference"] = {
            "groups": [first, second],
            "pooled_delta_pp": 100 * float(diff.mean()),
            "pooled_delta_pp_ci": list(paired_interval_pp(diff, seed)),
        }
    return result


def format_comparison(result: dict) -> str:
    """A Markdown table: one row per checkpoint, and mean ± sd for groups of several, accuracy in %."""
    parts = [*result["splits"], "pooled"]
    sizes = {**result["splits"], "pooled": sum(result["splits"].values())}
    lines = ["| checkpoint | " + " | ".join(f"{p} ({sizes[p]})" for p in parts) + " |",
             "| --- |" + " ---: |" * len(parts)]
    for name, group in result["groups"].items():
        for run in group["runs"]:
            lines.append(f"| {run['checkpoint']} | " + " | ".join(f"{100 * run[p]:.2f}" for p in parts) + " |")
        if len(group["runs"]) > 1:
            lines.append(f"| **{name}, mean ± sd over {len(group['runs'])}** | "
                         + " | ".join(f"{100 * group['mean'][p]:.2f} ± {100 * group['sd'][p]:.2f}" for p in parts) + " |")
    if "difference" in result:
        d = result["difference"]
        low, high = d["pooled_delta_pp_ci"]
        lines.append(f"\n{d['groups'][0]} − {d['groups'][1]} on the pooled images: "
                     f"{d['pooled_delta_pp']:+.2f} pp (95% paired bootstrap interval {low:+.2f} to {high:+.2f})")
    return "\n".join(lines)
