"""Full-configuration accuracy of jointly trained backbones vs full-configuration-only references, over seeds.

    python experiments/compare_backbones.py --dataset digits \\
        --joint checkpoints/digits checkpoints/reference/digits-seeds/joint-seed{1,2} \\
        --reference checkpoints/reference/digits-full-only checkpoints/reference/digits-seeds/full-only-seed{1,2} \\
        --json reports/digits_joint_vs_reference.json --markdown reports/digits_joint_vs_reference.md
    python experiments/compare_backbones.py --dataset fashion-mnist --splits backbone_train,test \\
        --joint checkpoints/fashion-mnist --reference checkpoints/reference/fashion-mnist-full-only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from backbone.compare import HELD_OUT_SPLITS, compare_backbones, format_comparison
from backbone.data import SplitConfig, load_dataset
from backbone.errors import HelpFormatter, run_cli
from backbone.io import check_output_path, write_json, write_text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits', 'fashion-mnist' or a path to an .npz")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the four stratified splits")
    parser.add_argument("--joint", nargs="+", required=True, help="jointly trained checkpoint directories, one per seed")
    parser.add_argument("--reference", nargs="+", required=True, help="full-configuration-only checkpoints, one per seed")
    parser.add_argument("--splits", type=lambda v: tuple(v.split(",")), default=HELD_OUT_SPLITS,
                        help="comma-separated splits to score and pool (default: the three the backbones never train on; "
                             "add backbone_train to see how well each model fits its own training images)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this Markdown file (default: none)")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    check_output_path(args.markdown, "--markdown")

    data = load_dataset(args.dataset, args.data_dir, SplitConfig(seed=args.split_seed))
    result = compare_backbones({"joint": args.joint, "reference": args.reference}, data, args.split_seed, args.splits)
    table = format_comparison(result)
    print(table)
    if args.json:
        write_json(Path(args.json), result)
    if args.markdown:
        write_text(args.markdown, table + "\n")
    return result


if __name__ == "__main__":
    run_cli(main)
