"""The reward of one step, shared by the single env and the batched VecEnv.

``reward = accuracy_term - lam * cost / full_cost``, with the accuracy term one of
``'correct'`` (1 when the top-1 prediction is the true class), ``'agree'`` (1 when it is
the full configuration's prediction: the label-free quantity the promise bounds) or
``'logprob'`` (the true class's log-probability). ``lam`` comes from an ``envs.price.Price``:
fixed, or drawn per episode log-uniformly from a range and shown to the policy as one extra
observation column, so one policy serves every price (the calibration then scans its grid).

An action's ``cost`` is a grid ``(K, L, M)`` as a fraction of the full configuration's cost:
staged FLOPs over the full configuration's FLOPs by default (``cost_grid``), or any other
measure of the same shape, such as a measured latency table's staged ms over the full
configuration's ms (``experiments/train_policy.py --cost latency``).
"""

from __future__ import annotations

import numpy as np

REWARDS = ("correct", "agree", "logprob")


def check_reward(kind: str) -> str:
    if kind not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
    return kind


def reward(accuracy_term: np.ndarray | float, cost: np.ndarray | float, lam: np.ndarray | float) -> np.ndarray:
    """Reward of steps: ``accuracy_term - lam * cost`` (``cost`` as a fraction of the full configuration's)."""
    return np.asarray(accuracy_term, dtype=np.float64) - np.asarray(lam, dtype=np.float64) * cost


def cost_grid(cost: np.ndarray | None, staged_flops: np.ndarray, full_flops: float) -> np.ndarray:
    """The price of each action ``(K, L, M)`` float64, as a fraction of the full configuration's cost.

    ``cost`` None: staged FLOPs over the full configuration's FLOPs. Otherwise ``cost`` itself, which must
    have the grid's shape and be finite and >= 0 (refused with a ValueError otherwise).
    """
    if cost is None:
        return (np.asarray(staged_flops) / float(full_flops)).astype(np.float64)
    grid = np.asarray(cost, dtype=np.float64)
    if grid.shape != np.shape(staged_flops):
        raise ValueError(f"cost grid has shape {grid.shape}, the action grid is {np.shape(staged_flops)}")
    if not (np.isfinite(grid).all() and (grid >= 0).all()):
        raise ValueError("cost grid must be finite and >= 0")
    return grid
