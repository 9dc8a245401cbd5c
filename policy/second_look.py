"""The second look: an extension that is itself unsure is extended again, to the full configuration.

The policy picks each input's configuration from the glance alone. The rare inputs on which a mid-sized
extension still disagrees with the full model are mostly inputs that extension is unsure of (its largest softmax
probability near one half), which the glance could not tell apart from the ones it gets right. A policy artifact
with ``meta["second_look"]`` = a threshold answers such an input with the full configuration instead: every
extension (not the glance's own answer, not the full configuration) whose largest softmax probability is below
the threshold is extended from the same glance to the full configuration, and that second extension is paid on
top of the first. The same rule runs on outcome tables (``policy.artifact.policy_outcome``), in the classifier
and in the serving stages, so what calibration certifies is what inference does.
"""

from __future__ import annotations

import math

import numpy as np

from envs import FeatureSpec


def check_second_look(threshold: float | None) -> float | None:
    """``threshold`` as a float in (0, 1), or None (no second look); ``ValueError`` otherwise."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1 \
            or not math.isfinite(threshold):
        raise ValueError(f"a second look's threshold is a softmax probability in (0, 1), got {threshold!r}")
    return float(threshold)


def looked_again(confidence: np.ndarray, actions: np.ndarray, glance_action: tuple[int, int, int],
                 full_action: tuple[int, int, int], threshold: float | None) -> np.ndarray:
    """Which inputs go on to the full configuration ``(n,)`` bool: their action ``(n, 3)`` is an extension (neither
    ``glance_action`` nor ``full_action``) and its answer's largest softmax probability ``confidence`` ``(n,)`` is
    below ``threshold`` (none when the threshold is None)."""
    actions = np.asarray(actions)
    if threshold is None:
        return np.zeros(len(actions), bool)
    extension = ~(actions == np.array(glance_action)).all(1) & ~(actions == np.array(full_action)).all(1)
    return extension & (np.asarray(confidence) < threshold)


def glance_action(spec: FeatureSpec, token_grans: tuple[int, ...], ffn_widths: tuple[float, ...]) -> tuple[int, int, int]:
    """The action ``(token index, depth - 1, width index)`` of ``spec``'s glance on a grid of ``token_grans`` and
    ``ffn_widths``."""
    tokens = token_grans[0] if spec.glance_tokens is None else spec.glance_tokens
    width = ffn_widths[0] if spec.glance_width is None else spec.glance_width
    return list(token_grans).index(tokens), spec.glance_depth - 1, [float(w) for w in ffn_widths].index(float(width))


def second_look_cost(grid: np.ndarray, glance: tuple[int, int, int]) -> float:
    """What the second look adds to an input's cost on a staged grid ``(K, L, M)`` (FLOPs, ms or a fraction):
    the extension from the glance to the full configuration."""
    grid = np.asarray(grid, dtype=np.float64)
    return float(grid[-1, -1, -1] - grid[glance])
