"""Speed at the paper's scale (the paper-in1k preset, 224 px RGB, 75 GFLOPs per image), with RANDOM weights.

Random weights time the arithmetic only: no accuracy is measured or implied. Part ``inference`` (one file set per
device and path, reports/bench_scale_<device>_<path>.json and .md): batch-1 latency of each configuration, images/s
of some at larger batches, and the adaptive classifier answering a fixed mix of configurations (the mix the
Fashion-MNIST policy chooses, mapped onto the same grid positions, at its calibrated price and at its certified
operating point) through its glance, plan and extension passes, against the full model on the same path in the same
interleaved rounds. Part ``training`` (reports/bench_scale_<device>_training.*): images/s of building outcome tables,
PPO steps/s and memory over a synthetic memory-mapped table of --ppo-rows rows, and the memory of merging torchrun's
table shards at two sizes (--merge-rows).

    python experiments/bench_scale.py --threads 1 --quiet                                  # eager, CPU
    python experiments/bench_scale.py --threads 1 --path compiled --latency-configs used --throughput-batch-sizes 16
    python experiments/bench_scale.py --threads 1 --part training --quiet
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from backbone.config import paper_config
from backbone.data import load_dataset
from backbone.errors import HelpFormatter, ProjectError, finite_float, positive_int, positive_ints, run_cli
from backbone.io import atomic_write, check_output_path, write_json
from backbone.train import resolve_device
from evaluation.benchmark import device_name, matmul_peak
from evaluation.scale import (
    CONFIG_SETS,
    config_speed,
    format_configs,
    format_mixes,
    merge_memory,
    mix_speed,
    policy_mixes,
    ppo_speed,
    random_classifier,
    select_configs,
    synthetic_table,
    tabulation_speed,
)
from inference.classifier import AdaptiveClassifier
from inference.paths import INFERENCE_PATHS

GOAL = 0.85
"""The issue's goal for realized / FLOP speed-up at batch 1 and 16 on the CPU."""
RANDOM = "RANDOM weights (backbone and policy network): timing only, no accuracy is measured"


def inference_part(args, classifier: AdaptiveClassifier) -> tuple[dict, str]:
    c = classifier.backbone.config
    source = AdaptiveClassifier.from_dirs(args.mix_backbone, args.mix_policy)
    test = load_dataset("fashion-mnist", args.data_dir).splits["test"]
    mixes = policy_mixes(source, test.x[: args.mix_images], c, args.tolerance,
                         f"{args.mix_policy} on {min(args.mix_images, len(test))} Fashion-MNIST test images")
    used = [p for mix in mixes for p in mix.shares]
    images = torch.rand(max(args.images, *args.batch_sizes, *args.throughput_batch_sizes), c.in_chans, c.img_size,
                        c.img_size, generator=torch.Generator().manual_seed(args.seed)).to(classifier.runner.device)
    peak = matmul_peak(classifier.runner.device)
    latency = config_speed(classifier, images[:1], select_configs(c, args.latency_configs, used), 1,
                           args.config_rounds, progress=not args.quiet)
    throughput = [row for b in args.throughput_batch_sizes for row in config_speed(
        classifier, images[:b], select_configs(c, args.throughput_configs, used), b, args.config_rounds,
        progress=not args.quiet)]
    results = [mix_speed(classifier, images[: max(args.images if b == 1 else 2 * b, b)], mixes, b, args.rounds,
                         seed=args.seed, progress=not args.quiet) for b in args.batch_sizes]
    built = {"compile_s": classifier.compile_seconds, "programs_built": classifier.runner.programs_built}
    data = {"latency_batch1": latency, "throughput": throughput, "mixes": [m.to_dict() for m in mixes],
            "mix_results": results, "matmul_peak": peak, "goal_efficiency": GOAL, **built}
    tables = "\n\n".join([
        (f"measured float32 matmul peak {peak['gflop_per_s']:,.0f} GFLOP/s; {built['programs_built']} programs built "
         f"in {built['compile_s']:.0f} s before their first timed calls (none on eager)"),
        f"### Batch-1 latency per configuration (one image; median of {args.config_rounds} interleaved timed calls)",
        format_configs(latency, peak),
        f"### Images/s per configuration at larger batches (one batch; median of {args.config_rounds} timed calls)",
        format_configs(throughput, peak),
        "### Adaptive classifier on fixed mixes vs the full model (medians of interleaved rounds)",
        format_mixes(mixes, results, GOAL)])
    return data, tables


def training_part(args, classifier: AdaptiveClassifier) -> tuple[dict, str]:
    c = classifier.backbone.config
    images = torch.rand(args.tabulate_images, c.in_chans, c.img_size, c.img_size,
                        generator=torch.Generator().manual_seed(args.seed))
    tabulation = tabulation_speed(classifier.backbone, images, args.tabulate_batch)
    path = Path(args.scratch) / f"bench_scale_synthetic_{args.ppo_rows}.npz"
    try:
        synthetic_table(path, c, args.ppo_rows, seed=args.seed, progress=not args.quiet)
        ppo = ppo_speed(path, args.ppo_timesteps)
    finally:
        path.unlink(missing_ok=True)
    merges = [merge_memory(c, rows, args.merge_shards, args.scratch, args.seed) for rows in args.merge_rows]
    data = {"tabulation": tabulation, "ppo": ppo, "merges": merges}
    tables = "\n".join([
        "| measurement | value |", "| --- | ---: |",
        f"| tabulation: images / batch | {tabulation['images']} / {tabulation['batch_size']} |",
        f"| tabulation: images/s ({tabulation['configurations']} configurations each) | {tabulation['images_per_s']:.3f} |",
        f"| outcome table: bytes per row | {tabulation['bytes_per_row']:,} |",
        f"| process peak resident memory after tabulating, MiB | {tabulation['peak_rss_mib']:,.0f} |",
        f"| PPO table: rows, size on disk | {ppo['rows']:,}, {ppo['table_bytes'] / 2**30:.2f} GiB |",
        f"| PPO table: load and verify (memory-mapped), s | {ppo['load_and_verify_s']:.1f} |",
        f"| PPO: env steps timed, steps/s | {ppo['timesteps']:,}, {ppo['steps_per_s']:,.0f} |",
        (f"| PPO: resident memory after, anonymous / file-backed MiB | {ppo['rss_after_mib']['anon']:,.0f} / "
         f"{ppo['rss_after_mib']['file']:,.0f} |"),
        f"| PPO process: peak resident memory, MiB | {ppo['peak_rss_mib']:,.0f} |",
        *(f"| merging {m['shards']} shards of {m['rows']:,} rows ({m['table_bytes'] / 2**30:.2f} GiB): s, "
          f"peak anonymous memory growth MiB | {m['seconds']:.1f}, {m['anon_peak_growth_mib']:,.0f} |" for m in merges)])
    return data, tables


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--part", choices=("inference", "training"), default="inference", help="what to measure")
    parser.add_argument("--path", choices=INFERENCE_PATHS, default="eager", help="inference path of every variant")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 16], help="batch sizes of the mix benchmark")
    parser.add_argument("--images", type=positive_int, default=16,
                        help="random images at batch 1 (larger batches time two batches each)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; each variant its median")
    parser.add_argument("--latency-configs", default="all",
                        help=f"batch-1 configurations: {', '.join(CONFIG_SETS)} or tokens/depth/width,...")
    parser.add_argument("--throughput-configs", default="corners", help="configurations timed at larger batches")
    parser.add_argument("--config-rounds", type=positive_int, default=1,
                        help="interleaved rounds of the per-configuration timings")
    parser.add_argument("--throughput-batch-sizes", type=positive_ints, default=[16, 64],
                        help="batch sizes of the per-configuration images/s")
    parser.add_argument("--mix-backbone", default="checkpoints/fashion-mnist", help="backbone of the mixes' policy")
    parser.add_argument("--mix-policy", default="policies/fashion-mnist", help="policy whose choices make the mixes")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files (default: the system's)")
    parser.add_argument("--mix-images", type=positive_int, default=10_000, help="Fashion-MNIST test images the mixes are read from")
    parser.add_argument("--tolerance", type=finite_float, default=0.1,
                        help="disagreement (%%) of the certified operating point's mix")
    parser.add_argument("--tabulate-images", type=positive_int, default=24, help="random images tabulated (training part)")
    parser.add_argument("--tabulate-batch", type=positive_int, default=8, help="tabulation batch size")
    parser.add_argument("--ppo-rows", type=positive_int, default=1_281_167,
                        help="rows of the synthetic table (ImageNet-1K's training images)")
    parser.add_argument("--ppo-timesteps", type=positive_int, default=100_000, help="PPO env steps timed")
    parser.add_argument("--merge-rows", type=positive_ints, default=[40_000, 160_000],
                        help="rows of the synthetic tables whose torchrun shards are merged (memory at two sizes)")
    parser.add_argument("--merge-shards", type=positive_int, default=4, help="shards each merged table is split into")
    parser.add_argument("--scratch", default="/tmp", help="folder for the synthetic table (removed afterwards)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, images and assignments")
    parser.add_argument("--json", default=None, help="default reports/bench_scale_<device type>_<path or training>.json")
    parser.add_argument("--no-reports", action="store_true", help="print the tables only; write no file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_path(args.json, "--json")
    if not Path(args.scratch).is_dir():
        raise ProjectError(f"--scratch {args.scratch} is not a folder; give an existing one with room for the table")

    config = paper_config()
    print(f"paper-in1k preset: {config.grid_shape} grid, {RANDOM}", flush=True)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no GPU on this machine: the CUDA paths (graphs, compiled, bf16) are not measured", flush=True)
    classifier = random_classifier(config, args.path, args.seed, device)
    load_before = os.getloadavg()
    data, tables = (inference_part if args.part == "inference" else training_part)(args, classifier)
    load = {"before": load_before, "after": os.getloadavg()}
    label = args.path if args.part == "inference" else "training"
    head = (f"device: {device_name(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{label}; {RANDOM}; 1-minute load average {load_before[0]:.1f} before, "
            f"{load['after'][0]:.1f} after (ratios are measured within one run)")
    report = "\n\n".join([f"## bench_scale: paper-in1k, {label}", head, tables]) + "\n"
    print(report)
    if not args.no_reports:
        json_path = Path(args.json or f"reports/bench_scale_{device.type}_{label}.json")
        write_json(json_path, {"preset": "paper-in1k", "config": config.to_dict(), "device": str(device),
                               "device_name": device_name(device), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "path": args.path, "part": args.part,
                               "weights": "random", "cuda_available": cuda, "load_average": load,
                               "command": shlex.join(["python", "experiments/bench_scale.py", *sys.argv[1:]]), **data})
        atomic_write(json_path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(report))
    return data


if __name__ == "__main__":
    run_cli(main)
