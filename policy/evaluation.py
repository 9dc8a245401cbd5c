"""Accuracy and FLOPs of per-input configurations looked up in an outcome table."""

from __future__ import annotations

import numpy as np

from envs import OutcomeTable


def evaluate_actions(table: OutcomeTable, actions: np.ndarray, overhead_flops: float = 0.0) -> dict:
    """Accuracy and mean FLOPs per input of ``actions`` ``(n, 3)``; ``overhead_flops`` (policy cost) is added."""
    k, l, m = np.asarray(actions, dtype=np.int64).T
    correct = table.correct[np.arange(len(table)), k, l, m]
    mean_flops = float(table.flops[k, l, m].mean()) + overhead_flops
    return {
        "accuracy": float(correct.mean()),
        "flops": mean_flops,
        "flop_reduction": 1.0 - mean_flops / table.full_flops,
        "correct": correct,
    }


def full_actions(table: OutcomeTable) -> np.ndarray:
    """The full configuration for every input, ``(n, 3)``."""
    return np.tile(np.array(table.grid_shape) - 1, (len(table), 1))


def fixed_accuracy(table: OutcomeTable) -> np.ndarray:
    """Accuracy ``(K, L, M)`` of every fixed configuration."""
    return table.correct.mean(axis=0)


def cheapest_fixed_within(table: OutcomeTable, tolerance_pp: float = 0.1) -> tuple[int, int, int]:
    """Index ``(k, l, m)`` of the cheapest fixed configuration whose accuracy drop is at most ``tolerance_pp``."""
    accuracy = fixed_accuracy(table)
    ok = accuracy >= accuracy[-1, -1, -1] - tolerance_pp / 100 - 1e-12
    candidates = np.argwhere(ok)
    best = min(candidates, key=lambda idx: (table.flops[tuple(idx)], -accuracy[tuple(idx)]))
    return tuple(int(i) for i in best)
