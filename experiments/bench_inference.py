"""Benchmark adaptive inference: full configuration vs adaptive classifier vs naive largest-in-batch.

In one process on the same test images: the machine's matmul peak, per-image latency at batch 1
(p50/p90/p99, also of each configuration the policy uses), and images/s per batch size. Each run writes
one file set per (dataset, device type, path), replacing that benchmark's previous run:
reports/bench_inference_<dataset>_<device>_<path>.json and .md, reports/bench_latency_<dataset>_<device>_<path>.png.

    python experiments/bench_inference.py --rounds 5 --quiet                 # reports/bench_inference_fashion-mnist_cpu_eager.*
    python experiments/bench_inference.py --rounds 5 --path aot --quiet      # ..._cpu_aot.*
    python experiments/bench_inference.py --device cuda --path graphs --rounds 5   # on a GPU: ..._cuda_graphs.*
    python experiments/bench_inference.py --dataset digits --batch-sizes 1,64 --limit 512 --no-reports
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from backbone.data import dataset_name, default_paths
from backbone.errors import HelpFormatter, nonnegative_float, nonnegative_int, positive_int, positive_ints, run_cli
from backbone.folders import resident
from backbone.io import check_output_path, write_json, write_text
from backbone.train import resolve_device
from evaluation.benchmark import (
    benchmark_inference,
    device_name,
    format_latency,
    format_table,
    latency_batch1,
    matmul_peak,
)
from evaluation.plots import latency_plot
from inference.classifier import AdaptiveClassifier
from inference.paths import INFERENCE_PATHS
from policy.job import PolicyJob, job_dataset


def report_paths(dataset: str, device_type: str, path: str, json_path: str | None = None) -> dict[str, str]:
    """The benchmark's file set: one per (dataset, device type, path), the tables and the plot beside the JSON."""
    stem = f"{dataset_name(dataset)}_{device_type}_{path}"
    json_file = Path(json_path) if json_path else Path("reports") / f"bench_inference_{stem}.json"
    return {"json": str(json_file), "markdown": str(json_file.with_suffix(".md")),
            "plot": str(json_file.parent / f"bench_latency_{stem}.png")}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns one result dict per batch size (see ``evaluation.benchmark.benchmark_inference``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", help="'digits', 'fashion-mnist', a path to an .npz, or an image folder (the backbone's recorded splits)")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--policy", default=None, help="default policies/<dataset>")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 64, 256], help="comma-separated batch sizes")
    parser.add_argument("--limit", type=positive_int, default=2048, help="test images per batch size")
    parser.add_argument("--limit-batch1", type=positive_int, default=256, help="test images at batch size 1 (slow)")
    parser.add_argument("--min-seconds", type=nonnegative_float, default=1.0, help="least timing per variant and round")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; each variant reports its median")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed batches before each measurement")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    parser.add_argument("--path", choices=INFERENCE_PATHS, default="eager",
                        help="inference path of every variant, the full model included (compiled first, untimed)")
    parser.add_argument("--json", default=None,
                        help="write the results here (default: reports/bench_inference_<dataset>_<device type>_<path>.json)")
    parser.add_argument("--markdown", default=None, help="write the tables here (default: the --json path with .md)")
    parser.add_argument("--plot", default=None,
                        help="PNG of batch-1 latency against FLOPs per configuration "
                             "(default: bench_latency_<dataset>_<device type>_<path>.png beside the --json file)")
    parser.add_argument("--no-reports", action="store_true", help="print the tables only; write no file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.device = str(resolve_device(args.device))  # 'auto' named; cuda without CUDA refused before anything loads
    if args.no_reports:
        args.json = args.markdown = args.plot = None
    else:
        defaults = report_paths(args.dataset, torch.device(args.device).type, args.path, args.json)
        args.json, args.markdown, args.plot = (getattr(args, k) or defaults[k] for k in ("json", "markdown", "plot"))
    for flag in ("json", "markdown", "plot"):
        check_output_path(getattr(args, flag), f"--{flag}")
    if args.threads:
        torch.set_num_threads(args.threads)

    defaults = default_paths(args.dataset)
    backbone = args.backbone or defaults["backbone"]
    classifier = AdaptiveClassifier.from_dirs(backbone, args.policy or defaults["policy"], args.device, args.path)
    test = job_dataset(PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone)).splits["test"]
    images = torch.as_tensor(resident(test.x, len(test.x)))  # an image folder's read first: reading is not timed
    if args.path != "eager":
        made = "recorded into CUDA graphs" if args.path == "graphs" else "compiled"
        print(f"{args.path} path: each configuration is {made} on its first use, before any timing", flush=True)
    peak = matmul_peak(args.device)
    latency = latency_batch1(classifier, images[: args.limit_batch1], args.rounds, args.warmup, progress=not args.quiet)
    results = [
        benchmark_inference(classifier, images[: args.limit_batch1 if b == 1 else args.limit], b,
                            args.min_seconds, args.warmup, args.rounds, progress=not args.quiet)
        for b in args.batch_sizes
    ]
    device = device_name(args.device)
    tables = "\n".join([
        (f"device: {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.path} path; "
         f"measured float32 matmul peak {peak['gflop_per_s']:,.0f} GFLOP/s"),
        "", format_latency(latency, peak), "", format_table(results, peak),
    ])
    print(tables)
    if args.json:
        write_json(args.json, {"dataset": args.dataset, "device": args.device, "device_name": device,
                               "threads": torch.get_num_threads(), "torch": torch.__version__, "path": args.path, "matmul_peak": peak,
                               "latency_batch1": latency, "results": results})
    if args.markdown:
        write_text(args.markdown, tables + "\n")
    if args.plot:
        latency_plot(latency, args.plot, f"{args.dataset}: batch-1 latency on {device}")
    return results


if __name__ == "__main__":
    run_cli(main)
