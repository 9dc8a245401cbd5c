"""Throughput of the full configuration, the adaptive classifier and a naive largest-in-batch variant."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from backbone import flops, input_adapter_flops
from backbone.grid import GridPoint
from policy.classifier import AdaptiveClassifier

KEYS = ("full_images_per_s", "adaptive_images_per_s", "naive_images_per_s", "flop_speedup", "realized_speedup",
        "efficiency")


def _sync(device: torch.device) -> None:
    # CUDA calls return before the work is done; time only finished work
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_of(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Full batches of ``images`` (a ragged tail would time another batch size), or all images if fewer."""
    return [images[i : i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)] or [images]


def images_per_second(fn: Callable[[torch.Tensor], object], batches: list[torch.Tensor], warmup: int = 3,
                      min_seconds: float = 2.0) -> float:
    """Images/s of ``fn(batch)``: ``warmup`` untimed batches, then whole passes over ``batches`` for >= ``min_seconds``.

    Whole passes keep every variant on the same images, so the adaptive mix of configurations is the same.
    """
    device = batches[0].device
    with torch.inference_mode():
        for i in range(warmup):
            fn(batches[i % len(batches)])
        _sync(device)
        done, start = 0, time.perf_counter()
        while True:
            for batch in batches:
                fn(batch)
                done += len(batch)
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return done / elapsed


def largest_in_batch(configs: list[GridPoint]) -> GridPoint:
    """The naive choice: each axis at the largest value any input of the batch was given.

    The grid's axes are strictly increasing, so the largest value is the one at the largest index.
    """
    return max(c[0] for c in configs), max(c[1] for c in configs), max(c[2] for c in configs)


def benchmark_inference(classifier: AdaptiveClassifier, images: torch.Tensor, batch_size: int,
                        min_seconds: float = 1.0, warmup: int = 3, rounds: int = 3, progress: bool = False) -> dict:
    """Images/s of full, adaptive and naive inference on ``images`` ``(N, C, H, W)`` at one batch size.

    The three are measured in the same run on the same batches, interleaved over ``rounds`` rounds
    of at least ``min_seconds`` each; each variant's speed is its median round, so a burst of load
    on a shared machine moves one round, not the ratio. FLOPs are per image (policy included where paid).
    """
    model = classifier.backbone
    c = model.config
    batches = batches_of(images.to(next(model.parameters()).device), batch_size)

    def naive(x: torch.Tensor) -> torch.Tensor:
        input_tokens = model.embed(x)
        read_kv = model.read_kv(input_tokens)
        return model.run(input_tokens, *largest_in_batch(classifier.choose(input_tokens, read_kv)[0]), read_kv=read_kv)

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    variants = {"full": model, "adaptive": classifier.predict, "naive": naive}
    measured = {name: [] for name in variants}
    steps = [(r, name) for r in range(rounds) for name in variants]
    for r, name in tqdm(steps, desc=f"batch {batch_size}: rounds x variants", disable=not progress):
        measured[name].append(images_per_second(variants[name], batches, warmup, min_seconds))
    speed = {name: float(np.median(values)) for name, values in measured.items()}
    predictions = [classifier.predict(batch) for batch in batches]
    adaptive_flops = float(np.mean(np.concatenate([p.flops for p in predictions])))
    # the naive variant pays the glance and the policy, then a fresh pass at the batch's largest configuration
    glance = flops(c, *classifier.spec.glance_config(c)) - input_adapter_flops(c) if classifier.spec.glance else 0
    naive_flops = float(np.average([flops(c, *largest_in_batch(p.configs)) for p in predictions],
                                   weights=[len(p.configs) for p in predictions])) + glance + classifier.network_flops
    full_flops = flops(c)
    flop_speedup = full_flops / adaptive_flops
    realized = speed["adaptive"] / speed["full"]
    return {
        "batch_size": batch_size,
        "images": sum(len(b) for b in batches),
        "full_images_per_s": speed["full"],
        "adaptive_images_per_s": speed["adaptive"],
        "naive_images_per_s": speed["naive"],
        "full_gflops": full_flops / 1e9,
        "adaptive_gflops": adaptive_flops / 1e9,
        "naive_gflops": naive_flops / 1e9,
        "flop_speedup": flop_speedup,
        "realized_speedup": realized,
        "efficiency": realized / flop_speedup,
        "rounds": rounds,
    }


def format_table(results: list[dict]) -> str:
    """A markdown table of ``benchmark_inference`` results, one row per batch size."""
    header = ["batch", "images", "full img/s", "adaptive img/s", "naive img/s", "FLOP speedup", "realized speedup",
              "efficiency"]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for r in results:
        lines.append(f"| {r['batch_size']} | {r['images']} | {r['full_images_per_s']:,.0f} | "
                     f"{r['adaptive_images_per_s']:,.0f} | {r['naive_images_per_s']:,.0f} | {r['flop_speedup']:.2f} | "
                     f"{r['realized_speedup']:.2f} | {r['efficiency']:.2f} |")
    return "\n".join(lines)
