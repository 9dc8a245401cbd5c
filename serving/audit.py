"""The online audit: a share of requests is also run at the full configuration, and per operating point an
anytime-valid confidence sequence on the disagreement with it says whether the point keeps its promise.

The sequence is Clopper-Pearson's interval with the error budget spent across looks: look ``k`` (one audited
request) uses ``delta_k = delta * 6 / (pi^2 k^2)``, and ``sum_k delta_k = delta``, so each side holds at every
look at once with probability ``1 - delta`` however long the stream runs and whenever it is read. The upper
bound is what production traffic alone certifies so far (it starts at 100% and falls as audits come in). The
alarm fires when the *lower* bound passes the tolerance: the stream then shows with confidence ``1 - delta``
that the point's disagreement is above what it promised, and on a stream whose rate is within the tolerance
that happens with probability at most ``delta`` over the whole stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

from policy.selection import disagreement_upper_bound


def look_delta(delta: float, look: int) -> float:
    """The error budget of look ``look`` (1, 2, ...): ``delta * 6 / (pi^2 look^2)``, summing to ``delta``."""
    return delta * 6 / (math.pi**2 * look**2)


def lower_bound(disagreements: int, n: int, delta: float) -> float:
    """One-sided ``1 - delta`` Clopper-Pearson lower bound on a rate with ``disagreements`` out of ``n``."""
    if disagreements <= 0 or n <= 0:
        return 0.0
    return float(beta.ppf(delta, disagreements, n - disagreements + 1))


@dataclass
class AuditStream:
    """The audit of one operating point: its audited inputs so far and its confidence sequence."""

    tolerance: float
    """The disagreement the point promises, in %."""
    delta: float = 0.1
    n: int = 0
    """Audited inputs."""
    disagreements: int = 0
    """Audited inputs whose class differs from the full configuration's."""
    looks: int = 0
    """Audited requests (each one look at the sequence)."""
    upper: float = 1.0
    """The sequence's upper bound on the disagreement rate (a share)."""
    lower: float = 0.0
    alarm_look: int | None = None
    """The look at which the alarm fired (None: not fired)."""

    @property
    def alarmed(self) -> bool:
        return self.alarm_look is not None

    def record(self, disagreements: int, n: int) -> bool:
        """Add one audited request: ``disagreements`` of its ``n`` inputs differ; True when this look fires the
        alarm (once per stream)."""
        self.n, self.disagreements, self.looks = self.n + n, self.disagreements + disagreements, self.looks + 1
        spent = look_delta(self.delta, self.looks)
        self.upper = disagreement_upper_bound(self.disagreements, self.n, spent)
        self.lower = lower_bound(self.disagreements, self.n, spent)
        if self.alarm_look is None and self.lower > self.tolerance / 100:
            self.alarm_look = self.looks
            return True
        return False

    def to_dict(self) -> dict:
        return {"tolerance": self.tolerance, "delta": self.delta, "n": self.n, "disagreements": self.disagreements,
                "looks": self.looks, "upper": self.upper, "lower": self.lower, "alarmed": self.alarmed,
                "alarm_look": self.alarm_look}


class Audit:
    """Which requests to audit (a seeded draw at ``share``) and one ``AuditStream`` per operating point."""

    def __init__(self, share: float = 0.01, delta: float = 0.1, seed: int = 0) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"the audit share must be in [0, 1], got {share}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.share, self.delta = share, delta
        self.rng = np.random.default_rng(seed)
        self.streams: dict[str, AuditStream] = {}

    def wants(self) -> bool:
        """Whether to audit the next request."""
        return bool(self.share > 0 and self.rng.random() < self.share)

    def record(self, key: str, tolerance: float, disagreements: int, n: int) -> bool:
        """Add an audited request of operating point ``key``; True when it fires that point's alarm."""
        stream = self.streams.setdefault(key, AuditStream(tolerance, self.delta))
        return stream.record(disagreements, n)

    def alarmed(self, key: str) -> bool:
        stream = self.streams.get(key)
        return stream is not None and stream.alarmed
