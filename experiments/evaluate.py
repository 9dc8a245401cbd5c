"""Compare a policy with fixed configurations, early exit, random and the oracle on the test split.

    python experiments/evaluate.py                                   # digits, policies/digits
    python experiments/evaluate.py --dataset fashion-mnist --backbone checkpoints/fashion-mnist \\
        --policy policies/fashion-mnist --json reports/fashion-mnist.json --markdown reports/fashion-mnist.md \\
        --plot reports/fashion-mnist.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from backbone.checkpoint import atomic_write, backbone_hash, load_checkpoint, write_json
from envs import FeatureSpec
from policy.artifact import load_policy
from policy.pipeline import PolicyJob, job_dataset, load_tables
from policy.plots import markdown_table, pareto_plot
from policy.report import build_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--policy", nargs="*", default=None, help="artifact directories; the first is the named policy")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--tolerance-pp", type=float, default=0.1)
    parser.add_argument("--no-throughput", action="store_true", help="skip the images/s measurements")
    parser.add_argument("--cache-dir", default=".cache/outcome_tables")
    args = parser.parse_args(argv)

    name = args.dataset if args.dataset in ("digits", "fashion-mnist") else Path(args.dataset).stem
    backbone_dir = args.backbone or f"checkpoints/{name}"
    policy_dirs = args.policy if args.policy is not None else [f"policies/{name}"]
    if policy_dirs and (Path(policy_dirs[0]) / "sweep").is_dir():  # the lambda sweep saved beside the policy
        policy_dirs += sorted(str(p) for p in (Path(policy_dirs[0]) / "sweep").iterdir())
    digest = backbone_hash(backbone_dir)
    policies = [load_policy(p, digest) for p in policy_dirs]
    spec = policies[0].feature_spec if policies else FeatureSpec()
    job = PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone_dir, cache_dir=args.cache_dir, features=spec)
    tables, _ = load_tables(job, ("calibration", "test"))
    model = load_checkpoint(backbone_dir)
    images = None
    if not args.no_throughput:
        images = job_dataset(job).splits["test"].x
    report = build_report(tables["test"], tables["calibration"], model, policies, images, args.tolerance_pp)
    report["dataset"] = args.dataset
    table = markdown_table(report)
    print(table)
    if args.json:
        write_json(args.json, report)
    if args.markdown:
        atomic_write(Path(args.markdown), lambda tmp: Path(tmp).write_text(table + "\n"))
    if args.plot:
        pareto_plot(report, args.plot, f"{args.dataset}: test split, {report['n_test']} images")
    return report


if __name__ == "__main__":
    main()
