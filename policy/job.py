"""The policy training job: outcome tables of the policy-train and calibration splits -> PPO -> calibrated artifact.

It never reads the test split: ``evaluation.pipeline`` scores what it returns there, once, and saves the
artifact with that summary as one unit.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backbone.checkpoint import backbone_hash, load_checkpoint, read_config
from backbone.data import Dataset, SplitConfig, dataset_name, load_dataset
from backbone.errors import ProjectError
from backbone.folders import SPLITS_FILE, FolderSpec, is_image_folder, load_folder, recorded_splits
from backbone.io import json_text
from envs import FeatureSpec, OutcomeTable, cached_outcome_table
from policy.artifact import SIDECAR, WEIGHTS, PolicyArtifact, save_policy
from policy.latency_table import LATENCY_FILE, LatencyTableError, check_latency_table, latency_cost, load_latency_table
from policy.train import PolicyTrainConfig, train_and_calibrate

SUMMARY = "summary.json"
"""The job's summary beside the policy it describes."""


@dataclass
class PolicyJob:
    """Where the inputs come from and where the outputs go."""

    dataset: str = "digits"
    data_dir: str | None = None
    backbone: str = "checkpoints/digits"
    out: str = "runs/digits/policy"
    cache_dir: str = ".cache/outcome_tables"
    log_dir: str = "runs"
    features: FeatureSpec = field(default_factory=FeatureSpec)
    train: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)
    quiet: bool = False
    """No progress bars."""
    workers: int = 2
    """Image folders: DataLoader processes that read the files (0: the main process)."""
    replace: bool = False
    """Write over a finished policy in ``out`` (else refused)."""
    report_test: bool = True
    """Score the chosen policy on the test split (the summary); off for recipe search, which must not read test
    (``experiments/develop.py`` compares recipes on calibration halves instead)."""
    latency: str | None = None
    """A latency table (``experiments/measure_latency.py``): required with ``train.cost == 'latency'``, which
    prices actions by its staged ms; checked against the backbone's grid and copied beside the policy
    (``latency.json``) either way, and its ms reported."""


def job_dataset(job: PolicyJob) -> Dataset:
    """The job's dataset, cut with the split seed its backbone was trained with; an image folder's splits are the
    file lists recorded beside the backbone (its file list checked unchanged), its images streamed from disk."""
    config, meta = read_config(job.backbone)
    if is_image_folder(job.dataset):
        record = recorded_splits(job.backbone, meta)
        if record is None:
            raise ProjectError(f"backbone {job.backbone} was trained on {meta.get('dataset')!r}, not on an image "
                               "folder; pass its --dataset, or a backbone trained on this folder")
        spec = FolderSpec(config.img_size, config.in_chans, job.workers)
        return load_folder(job.dataset, spec, record=record, source=str(Path(job.backbone) / SPLITS_FILE))
    if meta.get("dataset") not in (None, job.dataset):
        raise ProjectError(
            f"backbone {job.backbone} was trained on {meta['dataset']!r}, not {job.dataset!r}; "
            "pass the matching --dataset or --backbone"
        )
    return load_dataset(job.dataset, job.data_dir, SplitConfig(seed=int(meta.get("split_seed", 0))))


def load_tables(
    job: PolicyJob, splits=("policy_train", "calibration", "test"), device: str | torch.device = "cpu",
    data: Dataset | None = None,
) -> tuple[dict[str, OutcomeTable], str]:
    """Outcome tables of ``splits`` for the job's backbone (cached), and the backbone's hash. ``data``: the job's
    dataset (``job_dataset``) when the caller already has it, so that it is read (and a folder listed) once."""
    data = job_dataset(job) if data is None else data
    model = load_checkpoint(job.backbone, device)
    digest = backbone_hash(job.backbone)
    tables = {
        name: cached_outcome_table(model, digest, name, data.splits[name].x, data.splits[name].y, job.features,
                                   job.cache_dir, progress=not job.quiet)
        for name in splits
    }
    return tables, digest


def check_out(job: PolicyJob) -> None:
    """Refuse to write over a finished policy unless ``job.replace``, or into a place where one of its files is a
    folder; say so when replacing. Checked before any work, so that a refusal changes nothing."""
    out = Path(job.out)
    if out.exists() and not out.is_dir():
        raise ProjectError(f"--out {out} is a file; give a folder for the policy")
    for name in (WEIGHTS, SIDECAR, SUMMARY, LATENCY_FILE):
        if (out / name).is_dir():
            raise ProjectError(f"{out / name} is a folder where the policy's {name} goes; remove it or use another --out")
    if (Path(job.out) / "policy.json").is_file():
        if not job.replace:
            raise ProjectError(f"{job.out} already holds a policy; pass --force to replace it, or --out for another")
        print(f"replacing the policy in {job.out}")


def job_latency(job: PolicyJob) -> dict | None:
    """The job's latency table, checked against the backbone's grid and the job's glance (None without one);
    refuses ``cost == 'latency'`` without a table."""
    if job.latency is None:
        if job.train.cost == "latency":
            raise LatencyTableError("pricing by latency needs a measured latency table: pass --latency PATH "
                                    "(measure one with experiments/measure_latency.py)")
        return None
    latency = load_latency_table(job.latency)
    check_latency_table(latency, read_config(job.backbone)[0], job.features, f"latency table {job.latency}")
    return latency


@dataclass
class TrainedPolicy:
    """What the training job made, not yet saved: the chosen artifact, the sweep it was chosen from (one policy
    per price with ``--lambdas``, else just the chosen one), the outcome tables it read, and the files that
    travel with the artifact."""

    artifact: PolicyArtifact
    sweep: list[PolicyArtifact]
    tables: dict[str, OutcomeTable]
    latency: dict | None
    extra_files: dict[str, bytes]
    data: Dataset
    """The job's dataset, whose test split the main job tabulates."""


def train_policy_job(job: PolicyJob) -> TrainedPolicy:
    """Check the job's outputs and latency table, build (or read cached) tables of the policy-train and
    calibration splits, train and calibrate the policy. Writes only the sweep's members (``out/sweep``)."""
    check_out(job)
    latency = job_latency(job)  # checked before any table is built
    dataset = job_dataset(job)
    config, _ = read_config(job.backbone)
    job.features.check(config)
    tables, digest = load_tables(job, ("policy_train", "calibration"), data=dataset)
    meta = {
        "dataset": job.dataset,
        "backbone": str(job.backbone),
        "backbone_hash": digest,
        **config.grid_axes(),
        "features": job.features.to_dict(),
        "net_arch": list(job.train.net_arch),
        "action_space": {"type": "MultiDiscrete", "nvec": list(tables["calibration"].grid_shape),
                         "axes": ["token_gran_index", "exit_depth_minus_1", "ffn_width_index"]},
    }
    extra_files = {}
    if latency is not None:  # the table travels with the policy, tied to it by its digest
        data = json_text(latency).encode()
        extra_files[LATENCY_FILE] = data
        meta["latency"] = {"file": LATENCY_FILE, "sha256": hashlib.sha256(data).hexdigest(), "source": str(job.latency),
                           **{key: latency.get(key) for key in ("batch_size", "threads", "device", "device_name",
                                                                "full_ms", "glance_ms")}}
    run_name = f"policy_{dataset_name(job.dataset)}__{job.train.seed}__{int(time.time())}"
    artifact, sweep = train_and_calibrate(
        tables["policy_train"], tables["calibration"], job.train, meta, Path(job.log_dir) / run_name,
        cost=latency_cost(latency) if job.train.cost == "latency" else None,
    )
    if len(sweep) > 1:  # one policy per price: keep each beside the chosen one (evaluate.py reads them)
        for member in sweep:
            save_policy(member, Path(job.out) / "sweep" / f"lambda_{member.price.lam:g}")
    return TrainedPolicy(artifact, sweep, tables, latency, extra_files, dataset)
