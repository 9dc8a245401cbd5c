"""Measured latency of every grid point on the serving machine, at the serving batch size.

A FLOP is not a millisecond: at batch 1 on a CPU, per-operator overhead, not arithmetic, sets the
time of the small configurations, so two configurations with different FLOPs may take the same
time. ``measure_latency_table`` times, per grid point ``(K, L, M)`` and per image:

- ``staged_ms``: what the adaptive classifier pays for an input sent to that point: embed, the
  read's keys and values, the glance and its features, then (except at the glance's own point,
  whose answer is the glance's) ``extend`` to the point. Without a glance: the features, then a
  fresh pass reusing the read. The policy network is not included (it is the same for every point).
- ``fresh_ms``: one fresh pass ``model.run(model.embed(x), *point)``: what a fixed configuration pays.
- ``full_ms``: the full configuration, fresh.

Every point is timed in each of ``rounds`` rounds, in a new shuffled order each round
(interleaved, so slow drifts of the machine hit every point alike), after a warm-up; a point's
figure is the median of its rounds. The table is JSON, with where and how it was measured;
``policy.latency_table`` reads one back, refuses one measured for another grid, architecture or
glance, and turns it into the env's price grid (staged ms over full ms).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from backbone import AdaPerceiver
from backbone.grid import GridPoint
from envs import FeatureSpec, features_from
from evaluation.benchmark import device_name, sync
from policy.latency_table import FORMAT_VERSION, KINDS


@torch.inference_mode()
def measure_latency_table(
    model: AdaPerceiver,
    spec: FeatureSpec,
    images: torch.Tensor,
    batch_size: int = 1,
    rounds: int = 5,
    repeats: int = 5,
    warmup: int = 2,
    backbone_hash: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Per-image latency (ms) of every grid point, staged and fresh, at ``batch_size`` on the model's device.

    ``images`` ``(n, C, H, W)`` in ``[0, 1]``, ``n >= batch_size``: the first ``batch_size`` are the timed batch.
    Each point is run ``warmup`` times untimed, then in each of ``rounds`` rounds (points in a new
    shuffled order each round) ``repeats`` times back to back; a round's figure is their mean, a point's
    the median over rounds. Returns the JSON-ready table (see the module docstring).
    """
    for name, value in (("batch_size", batch_size), ("rounds", rounds), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if len(images) < batch_size:
        raise ValueError(f"{len(images)} images cannot fill a batch of {batch_size}; give more images or a smaller batch")
    model.eval()
    c = model.config
    device = next(model.parameters()).device
    x = images[:batch_size].to(device)
    model.check_images(x)
    glance = GridPoint(*model.resolve(*spec.glance_config(c))) if spec.glance else None
    shape = c.grid_shape

    def staged(point: GridPoint):
        def run() -> None:  # what AdaptiveClassifier pays for an input sent to ``point``, less the policy network
            tokens = model.embed(x)
            kv = model.read_kv(tokens)
            if glance is None:
                features_from(tokens, None, spec).cpu()
                model.run(tokens, *point, read_kv=kv)
                return
            logits, state = model.glance(tokens, *glance, read_kv=kv)
            features_from(tokens, logits, spec).cpu()  # the policy reads them on the host
            if point != glance:
                model.extend(state, *point)
        return run

    def fresh(point: GridPoint):
        return lambda: model.run(model.embed(x), *point)

    tasks = []
    for index in np.ndindex(*shape):
        point = GridPoint.from_action(index, c.token_grans, c.ffn_widths)
        tasks += [("staged", index, staged(point)), ("fresh", index, fresh(point))]
    samples = {kind: np.zeros((*shape, rounds)) for kind in KINDS}
    start = time.perf_counter()
    for _, _, run in tasks:
        for _ in range(warmup):
            run()
    sync(device)
    rng = np.random.default_rng(seed)
    with tqdm(total=rounds * len(tasks), desc="timing grid points", unit="point", disable=not progress) as bar:
        for r in range(rounds):
            for t in rng.permutation(len(tasks)):
                kind, index, run = tasks[t]
                sync(device)
                begin = time.perf_counter()
                for _ in range(repeats):
                    run()
                sync(device)
                samples[kind][(*index, r)] = 1e3 * (time.perf_counter() - begin) / (repeats * batch_size)
                bar.update()
    staged_ms, fresh_ms = (np.median(samples[kind], axis=-1) for kind in KINDS)
    glance_index = None if glance is None else glance.action(c.token_grans, c.ffn_widths)
    return {
        "format": FORMAT_VERSION,
        "unit": "ms per image",
        "note": ("staged_ms: embed, read, the glance and its features, then the extension to the point (none at the "
                 "glance's own point); fresh_ms: one fresh pass at the point; full_ms: the full configuration fresh. "
                 "The policy network is not included. Each figure is the median over interleaved rounds."),
        "batch_size": batch_size,
        "rounds": rounds,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "backbone_hash": backbone_hash,
        "architecture": c.to_dict(),
        **c.grid_axes(),
        "glance": None if glance is None else list(glance),
        "features": spec.to_dict(),
        "staged_ms": staged_ms.tolist(),
        "fresh_ms": fresh_ms.tolist(),
        "full_ms": float(fresh_ms[-1, -1, -1]),
        "glance_ms": None if glance_index is None else float(staged_ms[glance_index]),
        "measured_s": round(time.perf_counter() - start, 1),
    }
