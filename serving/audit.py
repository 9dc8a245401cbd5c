"""The online audit: a share of requests is also run at the full configuration, and per operating point an
anytime-valid confidence sequence on the disagreement with it, and an anytime-valid test, say whether the point
keeps its promise.

The sequence is Clopper-Pearson's interval with the error budget spent across looks: look ``k`` (one audited
request) uses ``delta_k = delta * 6 / (pi^2 k^2)``, and ``sum_k delta_k = delta``, so each side holds at every
look at once with probability ``1 - delta`` however long the stream runs and whenever it is read. The upper
bound is what production traffic alone certifies so far (it starts at 100% and falls as audits come in).

The alarm is a sequential test of "the disagreement rate is at most the tolerance ``p0``": its evidence is an
e-process, the average over a few alternative rates ``q = c * p0`` (``ALTERNATIVES``) of the likelihood ratio of
the audited images under ``q`` against ``p0``. Under any rate ``p <= p0`` each ratio's expected factor per image,
``p q / p0 + (1 - p)(1 - q) / (1 - p0)``, is at most 1, so the evidence is a nonnegative supermartingale started
at 1, and by Ville's inequality it ever reaches ``1 / delta`` with probability at most ``delta``: the alarm
fires then, at any look, and a stream within its tolerance raises it with probability at most ``delta`` over
its whole length. Spending ``delta`` look by look (as the interval does) would keep the same guarantee, but a
stream of 1-image requests looks at every audited image, and its budget per look shrinks so fast that a
5-8% disagreement against a 1% promise stayed unproven after 10,000 requests in most streams (docs/serving.md).
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


ALTERNATIVES = (2.0, 4.0, 8.0)
"""Alternative disagreement rates of the alarm's test, as multiples of the tolerance (weighted equally)."""


def evidence(disagreements, n, tolerance: float, alternatives=ALTERNATIVES):
    """The alarm's e-value after ``disagreements`` of ``n`` audited images differ (ints, or arrays of them),
    against a rate of at most ``tolerance`` (a share): the mean over ``q = min(c * tolerance, (1 + tolerance) / 2)``
    of ``(q / p0)^d ((1 - q) / (1 - p0))^(n - d)``."""
    d, n, p0 = np.asarray(disagreements, dtype=float), np.asarray(n, dtype=float), tolerance
    if p0 <= 0:  # a promise of no disagreement at all: one is proof
        out = np.where(d > 0, np.inf, 1.0)
    elif p0 >= 1:
        out = np.ones_like(d)
    else:
        qs = np.minimum(np.asarray(alternatives) * p0, (1 + p0) / 2)
        logs = d[..., None] * np.log(qs / p0) + (n - d)[..., None] * np.log((1 - qs) / (1 - p0))
        with np.errstate(over="ignore"):
            out = np.exp(np.logaddexp.reduce(logs, axis=-1) - np.log(len(qs)))
    return float(out) if out.ndim == 0 else out


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
    evidence: float = 1.0
    """The alarm's e-value against "disagreement <= tolerance" (it fires at ``1 / delta``)."""
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
        self.evidence = evidence(self.disagreements, self.n, self.tolerance / 100)
        if self.alarm_look is None and self.evidence >= 1 / self.delta:
            self.alarm_look = self.looks
            return True
        return False

    def to_dict(self) -> dict:
        return {"tolerance": self.tolerance, "delta": self.delta, "n": self.n, "disagreements": self.disagreements,
                "looks": self.looks, "upper": self.upper, "lower": self.lower, "evidence": self.evidence,
                "alarmed": self.alarmed,
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
