"""The latency controller: the p99 of a sliding window of request latencies against a target moves the server
along its ladder of certified operating points (cheaper under load, never past the last, back when load falls).

Clipper (NSDI 2017) holds a latency target by AIMD control of the batch size; here the knob is the compute per
input. Pure Python: ``observe`` latencies with their times and ``update`` at any time; tests drive it with
simulated signals.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ControllerConfig:
    """When the controller moves."""

    p99_target_ms: float = 250.0
    """The p99 request latency to hold, in ms."""
    window_s: float = 5.0
    """The sliding window the p99 is taken over, in seconds."""
    min_samples: int = 20
    """Fewer latencies than this in the window say nothing about load; a whole window that thin steps back."""
    hold_s: float = 2.0
    """Seconds after a move before the next (the window restarts at a move: latencies at the old point say
    nothing about the new one)."""
    recover_fraction: float = 0.5
    """Step back towards the default point when the p99 is below this share of the target."""

    def __post_init__(self) -> None:
        if not (self.p99_target_ms > 0 and self.window_s > 0 and self.hold_s >= 0 and self.min_samples >= 1):
            raise ValueError(f"controller settings must be positive, got {self}")
        if not 0 < self.recover_fraction < 1:
            raise ValueError(f"recover_fraction must be in (0, 1), got {self.recover_fraction}")


class LatencyController:
    """Which rung of a ladder of ``levels`` operating points to serve at: 0 is the default, ``levels - 1`` the
    cheapest the tolerance ceiling allows."""

    def __init__(self, levels: int, config: ControllerConfig | None = None) -> None:
        if levels < 1:
            raise ValueError(f"a ladder needs at least one level, got {levels}")
        self.levels, self.config = levels, config or ControllerConfig()
        self.level = 0
        self._window: deque[tuple[float, float]] = deque()  # (time s, latency ms), oldest first
        self._last_move = float("-inf")
        self.moves: list[tuple[float, int]] = []
        """``(time s, new level)`` of every move, in order."""

    def observe(self, now: float, latency_ms: float) -> None:
        """Record one request's latency (ms) finished at ``now`` (seconds, any monotonic clock)."""
        self._window.append((now, latency_ms))
        self._trim(now)

    def p99(self, now: float) -> float | None:
        """The p99 latency (ms) of the window ending at ``now``; None with fewer than ``min_samples``."""
        self._trim(now)
        if len(self._window) < self.config.min_samples:
            return None
        return float(np.percentile([ms for _, ms in self._window], 99))

    def update(self, now: float) -> int:
        """Move at most one rung: cheaper when the window's p99 is past the target, back when it is well below it
        (or a whole window since the last move was too thin to show load); the level to serve at."""
        c = self.config
        if now - self._last_move < c.hold_s:
            return self.level
        p99 = self.p99(now)
        if p99 is not None and p99 > c.p99_target_ms and self.level < self.levels - 1:
            self._move(now, self.level + 1)
        elif self.level > 0 and (p99 < c.recover_fraction * c.p99_target_ms if p99 is not None
                                 else now - self._last_move >= c.window_s):
            self._move(now, self.level - 1)
        return self.level

    def _move(self, now: float, level: int) -> None:
        self.level, self._last_move = level, now
        self._window.clear()
        self.moves.append((now, level))

    def _trim(self, now: float) -> None:
        while self._window and self._window[0][0] < now - self.config.window_s:
            self._window.popleft()
