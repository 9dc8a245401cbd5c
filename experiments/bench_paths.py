"""Compare inference paths at batch 1 in the same rounds, and profile each path's glance operator by operator.

The full model, the adaptive classifier and its glance (with the policy) on every path given, image by image
on the same test images, interleaved in the same rounds; per path the realized over the FLOP speed-up. Then
where a glance's time goes: ONNX Runtime's node profile (onnx) and torch's profiler (every path: all aten
operators on eager, only the calls a compiled program makes into aten on aot and compiled). Writes
reports/bench_paths_<dataset>_<device>.json and .md.

    python experiments/bench_paths.py --paths aot,onnx --threads 1 --quiet   # reports/bench_paths_fashion-mnist_cpu.*
    python experiments/bench_paths.py --dataset digits --paths eager,onnx --limit 32 --no-reports
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from backbone.data import dataset_name, default_paths
from backbone.errors import HelpFormatter, nonnegative_int, positive_int, run_cli
from backbone.folders import resident
from backbone.io import check_output_path, write_json, write_text
from evaluation.benchmark import device_name, format_paths, latency_across_paths
from evaluation.profiles import format_profile, onnx_profile, torch_profile
from inference.classifier import AdaptiveClassifier
from inference.paths import INFERENCE_PATHS
from policy.job import PolicyJob, job_dataset


def path_list(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in paths if p not in INFERENCE_PATHS]
    if not paths or unknown or len(set(paths)) != len(paths):
        raise argparse.ArgumentTypeError(f"give distinct paths among {', '.join(INFERENCE_PATHS)}, got {text!r}")
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", help="'digits', 'fashion-mnist', a path to an .npz, or an image folder (the backbone's recorded splits)")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--backbone", default=None, help="default checkpoints/<dataset>")
    parser.add_argument("--policy", default=None, help="default policies/<dataset>")
    parser.add_argument("--paths", type=path_list, default=["aot", "onnx"], help="comma-separated inference paths")
    parser.add_argument("--limit", type=positive_int, default=128, help="test images, each timed alone")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; each variant reports its median")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed images before each measurement")
    parser.add_argument("--profile-runs", type=positive_int, default=200, help="glances per profile")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch (and ONNX Runtime) threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here (default: reports/bench_paths_<dataset>_cpu.json)")
    parser.add_argument("--no-reports", action="store_true", help="print the tables only; write no file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    json_path = None if args.no_reports else Path(args.json or f"reports/bench_paths_{dataset_name(args.dataset)}_cpu.json")
    check_output_path(json_path and str(json_path), "--json")
    if args.threads:
        torch.set_num_threads(args.threads)

    defaults = default_paths(args.dataset)
    backbone = args.backbone or defaults["backbone"]
    classifiers = {path: AdaptiveClassifier.from_dirs(backbone, args.policy or defaults["policy"], path=path)
                   for path in args.paths}
    test = job_dataset(PolicyJob(dataset=args.dataset, data_dir=args.data_dir, backbone=backbone)).splits["test"]
    images = torch.as_tensor(resident(test.x, args.limit))  # an image folder's read first: reading is not timed
    print(f"paths {', '.join(args.paths)}: every program each uses is built before any timing", flush=True)
    latency = latency_across_paths(classifiers, images, args.rounds, args.warmup, progress=not args.quiet)
    one = images[:1]
    profiles = {f"{path}, torch profiler": torch_profile(lambda c=c: c.choose(one), args.profile_runs)
                for path, c in classifiers.items()}
    if "onnx" in classifiers:
        profiles["onnx, ONNX Runtime profiler"] = onnx_profile(classifiers["onnx"], one, args.profile_runs)
    compile_s = {path: round(c.compile_seconds, 1) for path, c in classifiers.items()}
    text = "\n".join([
        (f"device: {device_name('cpu')}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{latency['images']} test images of {args.dataset} at batch 1, median of {latency['rounds']} rounds; "
        f"programs built in (s): {compile_s}"),
        "", format_paths(latency), "",
        f"the glance (with the policy) of one image, {args.profile_runs} runs under each profiler (which slows it):",
        *(format_profile(name, profile) for name, profile in profiles.items()),
    ])
    print(text)
    result = {"dataset": args.dataset, "device_name": device_name("cpu"), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "compile_seconds": compile_s, "latency_batch1": latency, "profiles": profiles}
    if json_path:
        write_json(json_path, result)
        write_text(json_path.with_suffix(".md"), text + "\n")
    return result


if __name__ == "__main__":
    run_cli(main)
