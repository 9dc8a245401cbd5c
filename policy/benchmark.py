"""Throughput of the full configuration, the adaptive classifier and a naive largest-in-batch variant."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from backbone import flops
from policy.classifier import AdaptiveClassifier, Config


def _images_per_s(fn: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int, min_seconds: float) -> float:
    batches = [images[i : i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)] or [images]
    with torch.inference_mode():
        fn(batches[0])  # warm-up
        done, start = 0, time.perf_counter()
        while True:
            for batch in batches:
                fn(batch)
                done += len(batch)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return done / elapsed


def largest_in_batch(configs: list[Config], model_config) -> Config:
    """The naive choice: every axis at the largest value any input of the batch was given."""
    tokens = max(c[0] for c in configs)
    depth = max(c[1] for c in configs)
    width = max(c[2] for c in configs)
    return model_config.token_grans[model_config.token_index(tokens)], depth, width


def benchmark_inference(classifier: AdaptiveClassifier, images: torch.Tensor, batch_size: int, min_seconds: float = 2.0) -> dict:
    """Images/s of full, adaptive and naive inference at one batch size, measured in the same run."""
    model = classifier.backbone
    c = model.config

    def naive(x: torch.Tensor) -> None:
        input_tokens = model.embed(x)
        model.run(input_tokens, *largest_in_batch(classifier.choose(input_tokens), c))

    full_speed = _images_per_s(lambda x: model(x), images, batch_size, min_seconds)
    adaptive_speed = _images_per_s(classifier.predict, images, batch_size, min_seconds)
    naive_speed = _images_per_s(naive, images, batch_size, min_seconds)
    with torch.inference_mode():
        mean_flops = float(np.mean(np.concatenate(
            [classifier.predict(images[i : i + 256]).flops for i in range(0, len(images), 256)])))
    flop_speedup = flops(c) / mean_flops
    realized = adaptive_speed / full_speed
    return {
        "batch_size": batch_size,
        "full_images_per_s": full_speed,
        "adaptive_images_per_s": adaptive_speed,
        "naive_images_per_s": naive_speed,
        "flop_speedup": flop_speedup,
        "realized_speedup": realized,
        "efficiency": realized / flop_speedup,
    }
