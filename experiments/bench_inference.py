"""Benchmark adaptive inference: full configuration vs adaptive classifier vs naive largest-in-batch.

All three run in the same process on the same test images, per batch size:

    python experiments/bench_inference.py --json reports/bench_inference.json
    python experiments/bench_inference.py --dataset digits --batch-sizes 1,64 --limit 512
"""

from __future__ import annotations

import argparse
import platform

import torch

from backbone.data import default_paths
from backbone.errors import nonnegative_float, nonnegative_int, positive_int, positive_ints, run_cli
from backbone.io import check_output_path, write_json
from evaluation.benchmark import benchmark_inference, format_table
from evaluation.pipeline import PolicyJob, job_dataset
from policy.classifier import AdaptiveClassifier


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns one result dict per batch size (see ``evaluation.benchmark.benchmark_inference``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--policy", default=None, help="default policies/<dataset>")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 64, 256])
    parser.add_argument("--limit", type=positive_int, default=2048, help="test images per batch size")
    parser.add_argument("--limit-batch1", type=positive_int, default=256, help="test images at batch size 1 (slow)")
    parser.add_argument("--min-seconds", type=nonnegative_float, default=1.0, help="least timing per variant and round")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; each variant reports its median")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed batches before each measurement")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)

    defaults = default_paths(args.dataset)
    backbone = args.backbone or defaults["backbone"]
    classifier = AdaptiveClassifier.from_dirs(backbone, args.policy or defaults["policy"], args.device)
    test = job_dataset(PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone)).splits["test"]
    images = torch.as_tensor(test.x)
    results = [
        benchmark_inference(classifier, images[: args.limit_batch1 if b == 1 else args.limit], b,
                            args.min_seconds, args.warmup, args.rounds, progress=not args.quiet)
        for b in args.batch_sizes
    ]
    print(format_table(results))
    if args.json:
        write_json(args.json, {"dataset": args.dataset, "device": args.device, "threads": torch.get_num_threads(),
                               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                               "results": results})
    return results


if __name__ == "__main__":
    run_cli(main)
