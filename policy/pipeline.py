"""The main job: outcome tables -> PPO lambda sweep -> calibrated artifact -> test summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backbone.checkpoint import backbone_hash, load_checkpoint, read_config, write_json
from backbone.data import Dataset, SplitConfig, load_dataset
from envs import FeatureSpec, OutcomeTable, cached_outcome_table
from policy.artifact import PolicyArtifact, save_policy
from policy.evaluation import cheapest_fixed_within, evaluate_actions, full_actions
from policy.train import PolicyTrainConfig, train_and_calibrate


@dataclass
class PolicyJob:
    """Where the inputs come from and where the outputs go."""

    dataset: str = "digits"
    data_dir: str | None = None
    backbone: str = "checkpoints/digits"
    out: str = "policies/digits"
    cache_dir: str = ".cache/outcome_tables"
    log_dir: str = "runs"
    features: FeatureSpec = field(default_factory=FeatureSpec)
    train: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)


def job_dataset(job: PolicyJob) -> Dataset:
    """The job's dataset, cut with the split seed its backbone was trained with."""
    _, meta = read_config(job.backbone)
    if meta.get("dataset") not in (None, job.dataset):
        raise ValueError(
            f"backbone {job.backbone} was trained on {meta['dataset']!r}, not {job.dataset!r}; "
            "pass the matching --dataset or --backbone"
        )
    return load_dataset(job.dataset, job.data_dir, SplitConfig(seed=int(meta.get("split_seed", 0))))


def load_tables(
    job: PolicyJob, splits=("policy_train", "calibration", "test"), device: str | torch.device = "cpu"
) -> tuple[dict[str, OutcomeTable], str]:
    """Outcome tables of ``splits`` for the job's backbone (cached), and the backbone's hash."""
    data = job_dataset(job)
    model = load_checkpoint(job.backbone, device)
    digest = backbone_hash(job.backbone)
    tables = {
        name: cached_outcome_table(model, digest, name, data.splits[name].x, data.splits[name].y, job.features, job.cache_dir)
        for name in splits
    }
    return tables, digest


def summarize(artifact: PolicyArtifact, test: OutcomeTable, calibration: OutcomeTable, tolerance_pp: float) -> dict:
    """Test-split numbers of the policy (its cost included), the reference, and the best fixed baseline."""
    overhead = test.feature_flops + artifact.network_flops()
    reference = evaluate_actions(test, full_actions(test))
    result = evaluate_actions(test, artifact.act(test.features), overhead)
    k, l, m = cheapest_fixed_within(calibration, tolerance_pp)
    fixed = evaluate_actions(test, np.tile([k, l, m], (len(test), 1)))
    return {
        "n_test": len(test),
        "reference_accuracy": reference["accuracy"],
        "policy_accuracy": result["accuracy"],
        "delta_pp": 100 * (result["accuracy"] - reference["accuracy"]),
        "reference_gflops": test.full_flops / 1e9,
        "policy_gflops": result["flops"] / 1e9,
        "policy_overhead_gflops": overhead / 1e9,
        "flop_reduction": result["flop_reduction"],
        "lambda": artifact.meta["lam"],
        "calibration_delta_pp": artifact.meta["calibration_delta_pp"],
        "meets_calibration_target": artifact.meta["meets_target"],
        "fixed_baseline": {
            "config": list(test.configuration((k, l, m))),
            "accuracy": fixed["accuracy"],
            "delta_pp": 100 * (fixed["accuracy"] - reference["accuracy"]),
            "flop_reduction": fixed["flop_reduction"],
        },
    }


def run_policy_job(job: PolicyJob) -> dict:
    """Run the whole job; writes the artifact and ``summary.json`` into ``job.out`` and returns the summary."""
    tables, digest = load_tables(job)
    config, _ = read_config(job.backbone)
    meta = {
        "dataset": job.dataset,
        "backbone": str(job.backbone),
        "backbone_hash": digest,
        "token_grans": list(config.token_grans),
        "depths": list(range(1, config.depth + 1)),
        "ffn_widths": list(config.ffn_widths),
        "features": job.features.to_dict(),
        "feature_flops": tables["test"].feature_flops,
        "net_arch": list(job.train.net_arch),
        "action_space": {"type": "MultiDiscrete", "nvec": list(tables["test"].grid_shape),
                         "axes": ["token_gran_index", "exit_depth_minus_1", "ffn_width_index"]},
    }
    run_name = f"policy_{Path(job.dataset).stem}__{job.train.seed}__{int(time.time())}"
    artifact, sweep = train_and_calibrate(
        tables["policy_train"], tables["calibration"], job.train, meta, Path(job.log_dir) / run_name
    )
    for member in sweep:
        member.meta["policy_network_flops"] = member.network_flops()
        save_policy(member, Path(job.out) / "sweep" / f"lambda_{member.meta['lam']:g}")
    save_policy(artifact, job.out)
    summary = {"dataset": job.dataset, **summarize(artifact, tables["test"], tables["calibration"], job.train.tolerance_pp)}
    summary["sweep"] = artifact.meta["sweep"]
    write_json(Path(job.out) / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    fixed = summary["fixed_baseline"]
    return "\n".join([
        f"test split of {summary['dataset']} ({summary['n_test']} inputs)",
        f"  full model accuracy      {100 * summary['reference_accuracy']:.2f}%   {summary['reference_gflops'] * 1e3:.3f} MFLOPs/image",
        (f"  policy accuracy          {100 * summary['policy_accuracy']:.2f}%   {summary['policy_gflops'] * 1e3:.3f} MFLOPs/image"
         f" (policy cost {summary['policy_overhead_gflops'] * 1e3:.3f} included)"),
        f"  difference               {summary['delta_pp']:+.2f} pp (calibration {summary['calibration_delta_pp']:+.2f} pp, lambda {summary['lambda']:g})",
        f"  FLOP reduction           {100 * summary['flop_reduction']:.1f}%",
        (f"  cheapest fixed config within 0.1 pp on calibration {tuple(fixed['config'])}: "
         f"{fixed['delta_pp']:+.2f} pp, FLOP reduction {100 * fixed['flop_reduction']:.1f}%"),
    ])
