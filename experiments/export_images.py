"""Write the images of one split (or one of the report's unlabeled halves of it) as an .npz with 'x' only.

The halves are the ones `evaluate.py` cross-fits its certified run on (drawn without labels), so
`calibrate.py --unlabeled` on one half reproduces the price the report chose on that half.

    python experiments/export_images.py --dataset fashion-mnist --split test --half 1 --out /tmp/test_half1.npz
    python experiments/calibrate.py --backbone checkpoints/fashion-mnist --policy policies/fashion-mnist \\
        --unlabeled /tmp/test_half1.npz --out /tmp/calibrated-half1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from backbone.data import SPLIT_NAMES, default_paths
from backbone.errors import HelpFormatter, run_cli
from backbone.folders import resident
from backbone.io import atomic_write
from evaluation.report import split_halves
from policy.job import PolicyJob, job_dataset


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="default %(default)s")
    parser.add_argument("--data-dir", default=None, help="where the dataset's files are (default: its usual place)")
    parser.add_argument("--backbone", default=None, help="its split seed cuts the splits (default checkpoints/<dataset>)")
    parser.add_argument("--split", choices=SPLIT_NAMES, default="test", help="default %(default)s")
    parser.add_argument("--half", type=int, choices=(0, 1, 2), default=0,
                        help="1 or 2: that unlabeled half of the split, as the report draws it (seed 0); 0: all of it "
                             "(default %(default)s)")
    parser.add_argument("--out", required=True, help=".npz to write (float32 images in [0, 1], no labels)")
    args = parser.parse_args(argv)
    if Path(args.out).suffix != ".npz" or Path(args.out).is_dir():
        parser.error(f"--out must be a file path ending in .npz, got {args.out}")
    job = PolicyJob(dataset=args.dataset, data_dir=args.data_dir,
                    backbone=args.backbone or default_paths(args.dataset)["backbone"])
    split = job_dataset(job).splits[args.split].x
    x = resident(split, len(split)).numpy()  # an image folder's files, read and resized as the backbone sees them
    if args.half:
        x = x[split_halves(len(x))[args.half - 1]]

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a temporary name
            np.savez(f, x=x.astype(np.float32))

    atomic_write(Path(args.out), write)
    print(f"{len(x)} images of the {args.split} split{f' (half {args.half})' if args.half else ''} -> {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    run_cli(main)
