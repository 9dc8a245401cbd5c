"""Classify images with the adaptive classifier (backbone + policy): one line per image, then totals.

    python experiments/infer.py --backbone checkpoints/digits --policy policies/digits --input images.npz
    python experiments/infer.py --backbone checkpoints/fashion-mnist --policy policies/fashion-mnist --input photos/
    python experiments/infer.py --backbone checkpoints/fashion-mnist --policy policies/fashion-mnist --input photos/ --path aot
    python experiments/infer.py --backbone runs/shapes/backbone --policy runs/shapes/policy --input shapes/   # class folders

A folder of class subfolders is streamed from disk batch by batch, each file labelled by its folder's name (the
backbone's class names), so accuracy is reported too.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from backbone import flops
from backbone.checkpoint import read_config
from backbone.errors import HelpFormatter, finite_float, nonnegative_int, positive_int, run_cli
from backbone.folders import image_batches
from backbone.grid import GridPoint
from backbone.io import check_output_path, write_json
from backbone.train import resolve_device
from inference.classifier import AdaptiveClassifier, Prediction
from inference.inputs import open_images
from inference.paths import COMPILING_PATHS, INFERENCE_PATHS


def parse_config(text: str) -> GridPoint:
    """``"TOKENS,DEPTH,WIDTH"`` -> ``(tokens, depth, width)``; the grid itself is checked by the backbone."""
    try:
        tokens, depth, width = text.split(",")
        return int(tokens), int(depth), float(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKENS,DEPTH,WIDTH such as 16,4,1.0, got {text!r}") from None


def main(argv: list[str] | None = None) -> dict:
    """Run the CLI; returns ``{"images": [per-image rows], "totals": {...}}`` (what ``--json`` writes)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--backbone", required=True, help="checkpoint directory")
    parser.add_argument("--policy", required=True, help="policy artifact directory (made for this backbone)")
    parser.add_argument("--input", required=True,
                        help=".npz with 'x' (and 'y'), a folder of PNG/JPEG images, or a folder of class subfolders")
    parser.add_argument("--workers", type=nonnegative_int, default=2,
                        help="class folders: DataLoader processes reading the files (0: the main process)")
    parser.add_argument("--config", type=parse_config, default=None,
                        help="fixed TOKENS,DEPTH,WIDTH for every image instead of the policy (debugging)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    parser.add_argument("--path", choices=INFERENCE_PATHS, default="eager",
                        help="inference path: eager, compiled (torch.compile), aot (AOTInductor), graphs (CUDA "
                             "graphs, --device cuda) or onnx (ONNX Runtime, pip install -e '.[onnx]'); all but eager "
                             "build each program on first use, seconds each")
    parser.add_argument("--tolerance", type=finite_float, default=None,
                        help="disagreement with the full model allowed, in %%: the cheapest price the policy's "
                             "operating points certify at it (experiments/calibrate.py writes them; default: the "
                             "policy's own price)")
    parser.add_argument("--json", default=None, help="also write the per-image rows and totals here")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")

    resolve_device(args.device)  # refuses cuda without CUDA before anything is loaded
    classifier = AdaptiveClassifier.from_dirs(args.backbone, args.policy, args.device, args.path,
                                              tolerance=args.tolerance)
    if args.tolerance is not None:
        print(f"tolerance {args.tolerance:g}%: certified price lambda {classifier.lam:.4g}", file=sys.stderr)
    if args.path in COMPILING_PATHS:
        print(f"{args.path} path: each configuration is compiled on its first use (seconds each); wall_s includes "
              "that, compile_s is that part and images_per_s leaves it out", file=sys.stderr)
    classes = read_config(args.backbone)[1].get("classes")  # an image folder's class names, if trained on one
    images, names, labels = open_images(args.input, classifier.backbone.config, classes, args.workers)
    parts, wall = [], 0.0
    for batch in image_batches(images, args.batch_size):  # files are read between batches, outside the timing
        start = time.perf_counter()
        parts.append(classifier.predict_batched(batch, args.batch_size, args.config))  # CPU tensors, so synced
        wall += time.perf_counter() - start
    out = Prediction.cat(parts)

    rows = [{"name": name, "class": int(k), "confidence": float(p), "config": list(cfg)}
            for name, k, p, cfg in zip(names, out.classes.tolist(), out.confidence.tolist(), out.configs, strict=True)]
    for r in rows:
        if classes is not None:
            r["class_name"] = classes[r["class"]]
        named = f" ({r['class_name']})" if classes is not None else ""
        print(f"{r['name']}\tclass {r['class']}{named}\tconfidence {r['confidence']:.3f}\tconfig {tuple(r['config'])}")
    mean, full = float(out.flops.mean()), flops(classifier.backbone.config)
    totals = {"images": len(rows), "mean_gflops": mean / 1e9, "full_gflops": full / 1e9,
              "flop_reduction": 1 - mean / full, "wall_s": wall, "compile_s": classifier.compile_seconds,
              "images_per_s": len(rows) / (wall - classifier.compile_seconds)}
    if labels is not None:
        totals["accuracy"] = float((out.classes.numpy() == np.asarray(labels)).mean())
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in totals.items()))
    result = {"images": rows, "totals": totals}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    run_cli(main)
