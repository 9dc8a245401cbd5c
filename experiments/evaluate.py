"""Compare a policy with fixed configurations, early exit, random, a glance threshold, a supervised router
and the oracle on the test split; every family's knob is chosen by the same selection rule (fixed-sequence
testing), three times: the certified rule cross-fitted on unlabeled halves of test (the report's top level),
the certified accuracy rule on the calibration split, and the point-estimate rule on the calibration split.
With --seed-policies (the same recipe trained with other seeds), PPO and the router are reported over seeds.

    python experiments/evaluate.py                                   # digits, policies/digits
    python experiments/evaluate.py --dataset fashion-mnist --backbone checkpoints/fashion-mnist \\
        --policy policies/fashion-mnist --json reports/fashion-mnist.json --markdown reports/fashion-mnist.md \\
        --plot reports/fashion-mnist.png
    python experiments/evaluate.py --latency runs/digits/latency.json   # ms/image of every family too
"""

from __future__ import annotations

import argparse
from pathlib import Path

from backbone.checkpoint import backbone_hash, load_checkpoint, read_config
from backbone.data import default_paths
from backbone.errors import HelpFormatter, nonnegative_int, positive_int, run_cli
from backbone.folders import resident
from backbone.io import check_output_path, write_json, write_text
from envs import FeatureSpec
from evaluation.plots import markdown_table, pareto_plot
from evaluation.report import SelectionRun, build_report
from policy.artifact import load_policy
from policy.job import PolicyJob, job_dataset, load_tables
from policy.latency_table import LATENCY_FILE, check_latency_digest, check_latency_table, load_latency_table
from policy.selection import SelectionRule


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits', 'fashion-mnist', a path to an .npz, or an image folder (the backbone's recorded splits)")
    parser.add_argument("--workers", type=nonnegative_int, default=2,
                        help="image folders: DataLoader processes reading the files (0: the main process)")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--policy", nargs="*", default=None,
                        help="artifact directories; the first is the named policy (default policies/<dataset>)")
    parser.add_argument("--seed-policies", nargs="*", default=[],
                        help="the first policy's recipe trained with other seeds: PPO reported over seeds (default none)")
    parser.add_argument("--router-seeds", default="0,1,2", help="seeds the router is trained with (default %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this Markdown file (default: none)")
    parser.add_argument("--plot", default=None, help="also draw the Pareto plot into this PNG (default: none)")
    rule = SelectionRule()
    parser.add_argument("--tolerance-pp", type=float, default=rule.tolerance_pp,
                        help="disagreement (certified, %%) or accuracy drop (the labeled rules, pp) allowed (default %(default)s)")
    parser.add_argument("--margin-pp", type=float, default=rule.margin_pp, help="point-estimate rule: safety margin, pp (default %(default)s)")
    parser.add_argument("--delta", type=float, default=rule.delta, help="certified rules: failure probability of the whole fixed sequence (default %(default)s)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the images/s measurements")
    parser.add_argument("--throughput-images", type=positive_int, default=10000,
                        help="test images held in memory for the images/s measurements (an image folder's are read "
                             "from disk first: reading is not timed)")
    parser.add_argument("--latency", default=None,
                        help="latency table (experiments/measure_latency.py): adds ms/image to every family "
                        "(default: the latency.json beside the first policy, if any)")
    parser.add_argument("--cache-dir", default=".cache/outcome_tables", help="where outcome tables are cached, by backbone hash and split")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    check_output_path(args.markdown, "--markdown")
    check_output_path(args.plot, "--plot")
    try:
        runs = (SelectionRun(SelectionRule("certified", args.tolerance_pp, args.margin_pp, args.delta), "test_halves"),
                SelectionRun(SelectionRule("certified_accuracy", args.tolerance_pp, args.margin_pp, args.delta)),
                SelectionRun(SelectionRule("point_estimate", args.tolerance_pp, args.margin_pp, args.delta)))
        router_seeds = tuple(int(v) for v in args.router_seeds.split(","))
    except ValueError as err:
        parser.error(str(err))

    defaults = default_paths(args.dataset)
    backbone_dir = args.backbone or defaults["backbone"]
    policy_dirs = args.policy if args.policy is not None else [defaults["policy"]]
    if policy_dirs and (Path(policy_dirs[0]) / "sweep").is_dir():  # the lambda sweep saved beside the policy
        policy_dirs += sorted(str(p) for p in (Path(policy_dirs[0]) / "sweep").iterdir() if p.is_dir())
    digest = backbone_hash(backbone_dir)
    policies = [load_policy(p, digest) for p in policy_dirs]
    seed_policies = [load_policy(p, digest) for p in args.seed_policies]
    spec = policies[0].feature_spec if policies else FeatureSpec()
    latency_path = args.latency
    if latency_path is None and policy_dirs and (Path(policy_dirs[0]) / LATENCY_FILE).is_file():
        latency_path = str(Path(policy_dirs[0]) / LATENCY_FILE)
        check_latency_digest(latency_path, policies[0].meta)  # the table the policy was saved with, not a swapped one
    latency = None
    if latency_path is not None:  # checked before any table is built
        latency = load_latency_table(latency_path)
        check_latency_table(latency, read_config(backbone_dir)[0], spec if policies else None,
                            f"latency table {latency_path}")
        latency["source"] = latency_path
    job = PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone_dir, cache_dir=args.cache_dir, features=spec,
                    quiet=args.quiet, workers=args.workers)
    tables, _ = load_tables(job, ("policy_train", "calibration", "test"))
    model = load_checkpoint(backbone_dir)
    images = None
    if not args.no_throughput:
        images = resident(job_dataset(job).splits["test"].x, args.throughput_images)
    report = build_report(tables["test"], tables["calibration"], model, policies, images, tables["policy_train"], runs,
                          quiet=args.quiet, latency=latency, seed_policies=seed_policies, router_seeds=router_seeds)
    report["dataset"] = args.dataset
    table = markdown_table(report)
    print(table)
    if args.json:
        write_json(args.json, report)
    if args.markdown:
        write_text(args.markdown, table + "\n")
    if args.plot:
        pareto_plot(report, args.plot, f"{args.dataset}: test split, {report['n_test']} images")
    return report


if __name__ == "__main__":
    run_cli(main)
