"""Benchmark adaptive inference on CPU: full configuration vs adaptive classifier vs naive largest-in-batch.

    python experiments/bench_inference.py --json reports/bench_inference.json
"""

from __future__ import annotations

import argparse

import torch

from backbone.checkpoint import write_json
from policy.benchmark import benchmark_inference
from policy.classifier import AdaptiveClassifier
from policy.pipeline import PolicyJob, job_dataset


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--policy", default=None, help="default policies/<dataset>")
    parser.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64, 256])
    parser.add_argument("--limit", type=int, default=4096, help="test images used")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="measuring time per variant and batch size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = args.backbone or f"checkpoints/{args.dataset}"
    classifier = AdaptiveClassifier.from_dirs(backbone, args.policy or f"policies/{args.dataset}")
    images = job_dataset(PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone)).splits["test"].x[: args.limit]
    results = [benchmark_inference(classifier, images, b, args.min_seconds) for b in args.batch_sizes]
    print("| batch | full img/s | adaptive img/s | naive img/s | FLOP speedup | realized speedup | efficiency |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['batch_size']} | {r['full_images_per_s']:,.0f} | {r['adaptive_images_per_s']:,.0f} | "
              f"{r['naive_images_per_s']:,.0f} | {r['flop_speedup']:.2f} | {r['realized_speedup']:.2f} | {r['efficiency']:.2f} |")
    if args.json:
        write_json(args.json, {"dataset": args.dataset, "threads": torch.get_num_threads(), "results": results})
    return results


if __name__ == "__main__":
    main()
