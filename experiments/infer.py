"""Classify images with the adaptive classifier (backbone + policy).

    python experiments/infer.py --backbone checkpoints/digits --policy policies/digits --input images.npz
    python experiments/infer.py --backbone checkpoints/fashion-mnist --policy policies/fashion-mnist --input photos/
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from backbone import flops
from backbone.checkpoint import write_json
from policy.classifier import AdaptiveClassifier
from policy.inputs import load_images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--input", required=True, help=".npz with 'x' (and 'y') or a folder of PNG/JPEG images")
    parser.add_argument("--config", default=None, help="fixed TOKENS,DEPTH,WIDTH instead of the policy (debugging)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    classifier = AdaptiveClassifier.from_dirs(args.backbone, args.policy, args.device)
    config = None
    if args.config:
        tokens, depth, width = args.config.split(",")
        config = (int(tokens), int(depth), float(width))
    images, names, labels = load_images(args.input, classifier.backbone.config)
    start = time.perf_counter()
    parts = [classifier.predict(images[i : i + args.batch_size], config) for i in range(0, len(images), args.batch_size)]
    wall = time.perf_counter() - start
    classes = torch.cat([p.classes for p in parts]).numpy()
    confidence = torch.cat([p.confidence for p in parts]).numpy()
    configs = [c for p in parts for c in p.configs]
    per_image = np.concatenate([p.flops for p in parts])
    rows = [{"name": n, "class": int(k), "confidence": float(p), "config": list(c)}
            for n, k, p, c in zip(names, classes, confidence, configs, strict=True)]
    for r in rows:
        print(f"{r['name']}\tclass {r['class']}\tconfidence {r['confidence']:.3f}\tconfig {tuple(r['config'])}")
    full = flops(classifier.backbone.config)
    totals = {"images": len(rows), "mean_gflops": float(per_image.mean()) / 1e9, "full_gflops": full / 1e9,
              "flop_reduction": 1 - float(per_image.mean()) / full, "wall_s": wall, "images_per_s": len(rows) / wall}
    if labels is not None:
        totals["accuracy"] = float((classes == labels).mean())
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in totals.items()))
    result = {"images": rows, "totals": totals}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
