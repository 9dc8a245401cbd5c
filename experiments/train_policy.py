"""Train the adaptive-compute policy (PPO) on a frozen backbone and report it on the test split.

    python experiments/train_policy.py                       # digits, checkpoints/digits -> policies/digits
    python experiments/train_policy.py --dataset fashion-mnist --backbone checkpoints/fashion-mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

from backbone.checkpoint import write_json
from envs import FeatureSpec
from policy.pipeline import PolicyJob, format_summary, run_policy_job
from policy.train import PolicyTrainConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits', 'fashion-mnist' or a path to an .npz")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files")
    parser.add_argument("--backbone", default=None, help="checkpoint directory (default checkpoints/<dataset>)")
    parser.add_argument("--out", default=None, help="artifact directory (default policies/<dataset>)")
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file")
    parser.add_argument("--lambdas", type=lambda s: tuple(float(v) for v in s.split(",")), default=PolicyTrainConfig.lambdas)
    parser.add_argument("--timesteps", type=int, default=PolicyTrainConfig.total_timesteps, help="PPO steps per lambda")
    parser.add_argument("--tolerance-pp", type=float, default=PolicyTrainConfig.tolerance_pp)
    parser.add_argument("--margin-pp", type=float, default=PolicyTrainConfig.calibration_margin_pp,
                        help="calibration safety margin (pp) subtracted from the tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pooled", action="store_true", help="also give the policy the mean input token")
    parser.add_argument("--cache-dir", default=".cache/outcome_tables")
    parser.add_argument("--log-dir", default="runs", help="TensorBoard root")
    args = parser.parse_args(argv)

    name = args.dataset if args.dataset in ("digits", "fashion-mnist") else Path(args.dataset).stem
    job = PolicyJob(
        dataset=args.dataset,
        data_dir=args.data_dir,
        backbone=args.backbone or f"checkpoints/{name}",
        out=args.out or f"policies/{name}",
        cache_dir=args.cache_dir,
        log_dir=args.log_dir,
        features=FeatureSpec(pooled=args.pooled),
        train=PolicyTrainConfig(lambdas=args.lambdas, total_timesteps=args.timesteps, tolerance_pp=args.tolerance_pp,
                                calibration_margin_pp=args.margin_pp, seed=args.seed),
    )
    summary = run_policy_job(job)
    print(format_summary(summary))
    if args.json:
        write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
