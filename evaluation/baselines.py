"""The families a policy is compared with, computed from an outcome table.

Each family yields per-input actions ``(n, 3)`` (or, for early exit, exit depths),
and per-input FLOPs with every cost counted where it is paid.
"""

from __future__ import annotations

import numpy as np

from envs import OutcomeTable


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not beaten on both accuracy (higher) and FLOPs (lower), sorted by FLOPs."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["flops"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def oracle_actions(table: OutcomeTable) -> np.ndarray:
    """Per input, the cheapest correct configuration; the full one where none is. ``(n, 3)``."""
    k_, l_, m_ = table.grid_shape
    order = np.argsort(table.flops.reshape(-1), kind="stable")
    correct = table.correct.reshape(len(table), -1)[:, order]
    first = np.where(correct.any(axis=1), correct.argmax(axis=1), -1)
    flat = np.where(first >= 0, order[np.maximum(first, 0)], k_ * l_ * m_ - 1)
    return np.stack(np.unravel_index(flat, (k_, l_, m_)), axis=1)


def early_exit(table: OutcomeTable, tau: float, width_index: int, readout_flops: float) -> dict:
    """Full tokens at one width; exit at the first depth whose max softmax >= ``tau``.

    Cost: the configuration at the exit depth plus one readout (write + head) for every
    block passed before it, which early exit must compute to decide.
    """
    conf = table.confidence[:, -1, :, width_index]  # (n, L)
    depth = conf.shape[1]
    confident = conf >= tau
    exit_index = np.where(confident.any(axis=1), confident.argmax(axis=1), depth - 1)
    rows = np.arange(len(table))
    predicted = table.predicted[rows, -1, exit_index, width_index]
    flops = table.flops[-1, exit_index, width_index] + exit_index * readout_flops
    return {"tau": float(tau), "width": table.ffn_widths[width_index], "predicted": predicted,
            "correct": predicted == table.labels, "flops_per_input": flops, "exit_index": exit_index}


def matched_random_actions(table: OutcomeTable, target_flops: float, seed: int = 0) -> np.ndarray:
    """Random configurations with mean FLOPs ``target_flops``, ``(n, 3)``.

    The distribution is the maximum-entropy one over the grid at that mean
    (``p ∝ exp(-beta * flops)``, beta by bisection); it is sampled by quota so the
    realized mean hits the target up to rounding, then shuffled over the inputs.
    """
    flat = table.flops.reshape(-1).astype(np.float64)
    scale = flat.max()
    target = float(np.clip(target_flops, flat.min(), flat.max()))

    def mean_at(beta: float) -> float:
        logits = -beta * flat / scale
        p = np.exp(logits - logits.max())
        return float((p / p.sum()) @ flat)

    lo, hi = -200.0, 200.0  # mean_at decreases in beta
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_at(mid) > target else (lo, mid)
    logits = -lo * flat / scale
    p = np.exp(logits - logits.max())
    p /= p.sum()
    n = len(table)
    counts = np.floor(p * n).astype(int)
    rest = np.argsort(-(p * n - counts))[: n - counts.sum()]
    counts[rest] += 1
    flat_actions = np.repeat(np.arange(len(flat)), counts)
    np.random.default_rng(seed).shuffle(flat_actions)
    return np.stack(np.unravel_index(flat_actions, table.grid_shape), axis=1)
