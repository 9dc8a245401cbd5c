"""Build (and cache) the outcome tables of a frozen backbone; runs unchanged under torchrun.

    python experiments/build_tables.py --dataset fashion-mnist --backbone checkpoints/fashion-mnist
    python experiments/build_tables.py --dataset fashion-mnist --glance 4,2,0.25   # the shipped policy's tables
    torchrun --nproc_per_node=4 experiments/build_tables.py --dataset fashion-mnist --device cuda
    torchrun --nproc_per_node=2 experiments/build_tables.py --dataset photos/ --backbone runs/photos/backbone --workers 2
"""

from __future__ import annotations

import argparse

from backbone.data import default_paths
from backbone.distributed import init_distributed
from backbone.errors import HelpFormatter, nonnegative_int, run_cli
from backbone.train import resolve_device
from envs import FeatureSpec
from policy.job import PolicyJob, load_tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits', 'fashion-mnist', a path to an .npz, or an image folder (the backbone's recorded splits)")
    parser.add_argument("--workers", type=nonnegative_int, default=2,
                        help="image folders: DataLoader processes reading the files (0: the main process)")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--splits", default="policy_train,calibration,test", help="comma-separated splits to tabulate")
    FeatureSpec.add_flags(parser)
    parser.add_argument("--cache-dir", default=".cache/outcome_tables", help="where outcome tables are cached, by backbone hash and split")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    ctx = init_distributed(resolve_device(args.device))
    job = PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=args.backbone or default_paths(args.dataset)["backbone"],
                    cache_dir=args.cache_dir, features=FeatureSpec.from_flags(args.pooled, args.glance), quiet=args.quiet,
                    workers=args.workers)
    tables, digest = load_tables(job, tuple(args.splits.split(",")), device=ctx.device)
    if ctx.is_main:
        for name, table in tables.items():
            print(f"{name}: {len(table)} inputs, grid {table.grid_shape}, backbone {digest[:12]}")


if __name__ == "__main__":
    run_cli(main)
