"""Rank candidate glances on the calibration split (no policy trained, test not read): the share of images each
cheap configuration answers before its first disagreements with the full model, by its own confidence.

    python experiments/rank_glances.py --dataset fashion-mnist
    python experiments/rank_glances.py --dataset fashion-mnist --disagreements 0 --json reports/glances_fashion-mnist.json
"""

from __future__ import annotations

import argparse

from backbone.checkpoint import read_config
from backbone.data import default_paths
from backbone.errors import HelpFormatter, nonnegative_int, run_cli
from backbone.io import check_output_path, write_json
from evaluation.glances import rank_glances
from policy.job import PolicyJob, load_tables


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="default %(default)s")
    parser.add_argument("--data-dir", default=None, help="where the dataset's files are (default: its usual place)")
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--split", default="calibration", choices=("calibration", "policy_train"),
                        help="the split ranked on (default %(default)s; test is not offered)")
    parser.add_argument("--disagreements", type=nonnegative_int, default=1,
                        help="disagreements allowed among the answered images (default %(default)s)")
    parser.add_argument("--max-cost-share", type=float, default=0.15,
                        help="candidates costing at most this share of the full FLOPs (default %(default)s)")
    parser.add_argument("--top", type=nonnegative_int, default=10, help="rows printed (default %(default)s)")
    parser.add_argument("--cache-dir", default=".cache/outcome_tables", help="default %(default)s")
    parser.add_argument("--json", default=None, help="also write every row to this JSON file (default none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    backbone = args.backbone or default_paths(args.dataset)["backbone"]
    job = PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone, cache_dir=args.cache_dir,
                    quiet=args.quiet)
    tables, _ = load_tables(job, (args.split,))
    table = tables[args.split]
    rows = [r.to_dict() for r in rank_glances(table, read_config(backbone)[0], args.disagreements, args.max_cost_share)]
    print(f"{args.split} split, {len(table)} images; answered: most confident first, up to {args.disagreements} "
          "disagreement(s) with the full model; cut: those at the glance, the rest extended to the full model")
    print("| glance (tokens, depth, width) | cost, share of full | agreement | answered | cascade FLOP cut |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows[: args.top]:
        print(f"| {tuple(r['glance'])} | {100 * r['cost_share']:.1f}% | {100 * r['agreement']:.2f}% | "
              f"{100 * r['answered_share']:.1f}% | {100 * r['cascade_flop_reduction']:.1f}% |")
    if args.json:
        write_json(args.json, {"split": args.split, "n": len(table), "disagreements": args.disagreements, "rows": rows})
    return rows


if __name__ == "__main__":
    run_cli(main)
