"""Compare policy recipes without reading the test split: each policy certified on one unlabeled half of the
calibration split and measured on the other, then swapped.

    python experiments/develop.py --dataset fashion-mnist --policy runs/recipe-a runs/recipe-b
    python experiments/develop.py --dataset fashion-mnist --policy runs/seed0 runs/seed1 runs/seed2 --json dev.json
"""

from __future__ import annotations

import argparse

import numpy as np

from backbone.checkpoint import backbone_hash
from backbone.data import default_paths
from backbone.errors import HelpFormatter, finite_float, positive_int, run_cli
from backbone.io import check_output_path, write_json
from envs.price import GRID
from evaluation.development import develop
from policy.artifact import load_policy
from policy.job import PolicyJob, load_tables
from policy.second_look import check_second_look
from policy.selection import SelectionRule


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    rule = SelectionRule("certified")
    parser.add_argument("--dataset", default="digits", help="default %(default)s")
    parser.add_argument("--data-dir", default=None, help="where the dataset's files are (default: its usual place)")
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--policy", nargs="+", required=True, help="policy directories to compare")
    parser.add_argument("--tolerance-pp", type=finite_float, default=rule.tolerance_pp,
                        help="disagreement allowed, %% (default %(default)s)")
    parser.add_argument("--delta", type=finite_float, default=rule.delta, help="default %(default)s")
    parser.add_argument("--prices", type=positive_int, default=GRID,
                        help="prices scanned, log-spaced over each policy's range (default %(default)s)")
    parser.add_argument("--second-look", type=finite_float, default=None, metavar="PROBABILITY",
                        help="give every policy this second look (an extension less sure than this goes on to the "
                        "full configuration) in place of its own (default: each policy's own)")
    parser.add_argument("--cache-dir", default=".cache/outcome_tables", help="default %(default)s")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (default none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    try:
        rule = SelectionRule("certified", args.tolerance_pp, delta=args.delta)
    except ValueError as err:
        parser.error(str(err))
    backbone = args.backbone or default_paths(args.dataset)["backbone"]
    digest = backbone_hash(backbone)
    try:
        second_look = check_second_look(args.second_look)
    except ValueError as err:
        parser.error(str(err))
    policies = [load_policy(p, digest) for p in args.policy]
    if second_look is not None:
        for artifact in policies:
            artifact.meta["second_look"] = second_look
    rows = []
    for directory, artifact in zip(args.policy, policies, strict=True):
        job = PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone, cache_dir=args.cache_dir,
                        features=artifact.feature_spec, quiet=args.quiet)
        tables, _ = load_tables(job, ("calibration",))
        row = {"policy": directory, **develop(artifact, tables["calibration"], rule, prices=args.prices)}
        rows.append(row)
        print(f"{directory}: FLOP cut {100 * row['flop_reduction']:.1f}%, held-out disagreement "
              + " / ".join(f"{100 * d:.3f}%" for d in row["held_out_disagreement"])
              + f" (prices {', '.join(f'{lam:.3g}' + ('' if ok else ' †') for lam, ok in zip(row['lams'], row['meets_target'], strict=True))}"
              + f"; halves of the {row['n']}-image calibration split)")
    if not all(ok for row in rows for ok in row["meets_target"]):
        print("† the lowest price already failed on that half: nothing certified, the lowest taken")
    cuts = [row["flop_reduction"] for row in rows]
    if len(rows) > 1:
        print(f"mean FLOP cut {100 * np.mean(cuts):.1f}% ± {100 * np.std(cuts, ddof=1):.1f} (sd over {len(rows)} policies)")
    if args.json:
        write_json(args.json, {"rule": rule.to_dict(), "rows": rows})
    return rows


if __name__ == "__main__":
    run_cli(main)
