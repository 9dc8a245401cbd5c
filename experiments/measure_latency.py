"""Measure the latency table of a backbone on this machine: ms per image of every grid point, staged
(embed, glance, extension: what the adaptive classifier pays) and fresh (what a fixed configuration pays),
at the serving batch size; interleaved rounds, each figure a median. Train a policy priced by it with
``train_policy.py --cost latency --latency PATH``.

    python experiments/measure_latency.py                                  # digits -> runs/digits/latency.json
    python experiments/measure_latency.py --dataset fashion-mnist --batch-size 1 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from backbone.checkpoint import backbone_hash, load_checkpoint
from backbone.data import default_paths
from backbone.errors import HelpFormatter, ProjectError, nonnegative_int, positive_int, run_cli
from backbone.folders import resident
from backbone.io import check_output_path, write_json
from backbone.train import resolve_device
from envs import FeatureSpec
from evaluation.latency import measure_latency_table
from policy.job import PolicyJob, job_dataset
from policy.latency_table import format_latency_summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits', 'fashion-mnist', a path to an .npz, or an image folder (the backbone's recorded splits)")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files")
    parser.add_argument("--backbone", default=None, help="checkpoint directory (default checkpoints/<dataset>)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="the serving batch size (default 1)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds; each figure is their median")
    parser.add_argument("--repeats", type=positive_int, default=5, help="back-to-back runs of a point in each round")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed runs of each point first")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads, as the server will run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    FeatureSpec.add_flags(parser)
    parser.add_argument("--out", default=None, help="JSON table (default runs/<dataset>/latency.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    paths = default_paths(args.dataset)
    out = args.out or paths["latency"]
    check_output_path(out, "--out")
    device = resolve_device(args.device)  # refuses cuda without CUDA, before any work
    torch.set_num_threads(args.threads)
    backbone = args.backbone or paths["backbone"]
    model = load_checkpoint(backbone, device)
    spec = FeatureSpec.from_flags(args.pooled, args.glance)
    spec.check(model.config)  # a glance off the grid is refused before the (slow) read of the images
    job = PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone, quiet=args.quiet)
    test = job_dataset(job).splits["test"].x
    images = resident(test, len(test))  # an image folder's read first: reading is not timed
    if args.batch_size > len(images):
        raise ProjectError(f"--batch-size {args.batch_size} is larger than the {len(images)} test images it is timed "
                           f"on; give at most {len(images)}")
    table = measure_latency_table(model, spec, images, args.batch_size, args.rounds,
                                  args.repeats, args.warmup, backbone_hash(backbone), progress=not args.quiet)
    table.update(dataset=args.dataset, backbone=str(backbone))
    write_json(out, table)
    print(format_latency_summary(table))
    print(f"measured in {table['measured_s']:.0f} s; wrote {out}")
    return table


if __name__ == "__main__":
    run_cli(main)
