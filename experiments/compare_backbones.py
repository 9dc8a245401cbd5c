"""Full-configuration accuracy of jointly trained backbones vs full-configuration-only references, over seeds.

    python experiments/compare_backbones.py --dataset digits \\
        --joint checkpoints/digits checkpoints/reference/digits-seeds/joint-seed{1,2} \\
        --reference checkpoints/reference/digits-full-only checkpoints/reference/digits-seeds/full-only-seed{1,2} \\
        --json reports/digits_joint_vs_reference.json --markdown reports/digits_joint_vs_reference.md
    python experiments/compare_backbones.py --dataset fashion-mnist --splits backbone_train,test \\
        --joint checkpoints/fashion-mnist --reference checkpoints/reference/fashion-mnist-full-only
    python experiments/compare_backbones.py --dataset photos/ --joint checkpoints/photos --reference checkpoints/photos-full-only

An image folder is scored on the splits the first checkpoint records (its files streamed from disk); every other
checkpoint must record the same ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from backbone.compare import HELD_OUT_SPLITS, compare_backbones, comparison_data, format_comparison
from backbone.errors import HelpFormatter, nonnegative_int, run_cli
from backbone.io import check_output_path, write_json, write_text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits",
                        help="'digits', 'fashion-mnist', a path to an .npz, or an image folder (the checkpoints' recorded splits)")
    parser.add_argument("--workers", type=nonnegative_int, default=2,
                        help="image folders: DataLoader processes reading the files (0: the main process)")
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

    data = comparison_data(args.dataset, args.data_dir, args.split_seed, args.joint[0], args.workers)
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
