"""One selection rule for every family: the cheapest candidate that keeps the promise on calibration.

A family (fixed configurations, early-exit thresholds, random mixes, router margins, PPO
prices) offers candidates; each is scored on calibration inputs; the rule keeps the
cheapest one that passes. Two modes, one rule:

- ``empirical``: the calibration accuracy drop against the full configuration is at most
  ``tolerance_pp - margin_pp`` (a point estimate plus a safety margin; needs labels).
- ``certified``: the one-sided ``1 - delta`` Clopper-Pearson upper confidence bound on the
  share of inputs whose prediction differs from the full configuration's is at most
  ``tolerance_pp`` (CATs, EMNLP 2021; CALM, NeurIPS 2022). Disagreement bounds the accuracy
  loss and needs no labels, so it can be calibrated on unlabeled images of the deployment
  distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

from envs import OutcomeTable

MODES = ("empirical", "certified")


@dataclass(frozen=True)
class SelectionRule:
    """What "keeps the promise" means on calibration inputs."""

    mode: str = "empirical"
    """'empirical' (accuracy drop, labels) or 'certified' (upper bound on disagreement, no labels)."""
    tolerance_pp: float = 0.1
    """Largest accuracy drop (empirical) or disagreement (certified) allowed, in percentage points."""
    margin_pp: float = 0.1
    """Empirical mode: the calibration drop must be at most ``tolerance_pp - margin_pp``."""
    delta: float = 0.1
    """Certified mode: the bound holds with probability ``1 - delta``."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"selection mode must be one of {MODES}, got {self.mode!r}")
        if self.tolerance_pp < 0 or self.margin_pp < 0:
            raise ValueError(f"tolerance and margin must be >= 0 pp, got {self.tolerance_pp}, {self.margin_pp}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    def to_dict(self) -> dict:
        keep = ("mode", "tolerance_pp", "margin_pp") if self.mode == "empirical" else ("mode", "tolerance_pp", "delta")
        return {key: value for key, value in asdict(self).items() if key in keep}


@dataclass
class Candidate:
    """One candidate's results on the calibration inputs."""

    knob: Any
    """What the family varies (a configuration, a threshold, a price...)."""
    correct: np.ndarray
    """``(n,)`` bool: the candidate's prediction is the true class (unused in certified mode)."""
    agree: np.ndarray
    """``(n,)`` bool: the candidate predicts what the full configuration predicts."""
    flops: float
    """Mean FLOPs per input, every cost counted."""
    cost: float | None = None
    """Mean cost per input that "cheapest" ranks by (None: ``flops``); e.g. measured ms, for a policy priced by
    latency. Any unit: only the order of the candidates' costs matters."""

    def __post_init__(self) -> None:
        if self.cost is None:
            self.cost = float(self.flops)


@dataclass
class Outcome:
    """What one candidate does on the inputs of a table."""

    predicted: np.ndarray
    """``(n,)`` predicted classes."""
    flops: np.ndarray
    """``(n,)`` float64 FLOPs per input, every cost counted."""
    cost: np.ndarray | None = None
    """``(n,)`` float64 cost per input that the selection ranks by (None: ``flops``), e.g. measured ms."""
    actions: np.ndarray | None = None
    """``(n, 3)`` the grid point each input's answer is computed at (None where the family does not say)."""

    def __post_init__(self) -> None:
        if self.cost is None:
            self.cost = self.flops


def candidate(knob: Any, outcome: Outcome, table: OutcomeTable) -> Candidate:
    """A candidate's calibration results from its outcome on ``table``."""
    return Candidate(knob, outcome.predicted == table.labels, outcome.predicted == table.predicted[:, -1, -1, -1],
                     float(np.mean(outcome.flops)), float(np.mean(outcome.cost)))


def disagreement_upper_bound(disagreements: int, n: int, delta: float) -> float:
    """One-sided ``1 - delta`` Clopper-Pearson upper bound on a rate with ``disagreements`` out of ``n``."""
    if n <= 0:
        return 1.0
    if disagreements >= n:
        return 1.0
    return float(beta.ppf(1 - delta, disagreements + 1, n - disagreements))


def score(candidate: Candidate, reference_correct: np.ndarray, rule: SelectionRule) -> dict:
    """The statistic the rule judges, and whether it passes."""
    n = len(candidate.agree)
    disagreements = int(np.sum(~candidate.agree))
    out = {"flops": float(candidate.flops), "cost": float(candidate.cost), "disagreement": disagreements / max(n, 1)}
    if rule.mode == "empirical":
        drop_pp = 100 * (reference_correct.mean() - candidate.correct.mean())
        out.update(delta_pp=-float(drop_pp), passes=bool(drop_pp <= rule.tolerance_pp - rule.margin_pp + 1e-9))
    else:
        bound = disagreement_upper_bound(disagreements, n, rule.delta)
        out.update(disagreement_bound=bound, passes=bool(bound <= rule.tolerance_pp / 100 + 1e-12))
    return out


@dataclass
class Selection:
    """The rule's choice among a family's candidates."""

    index: int
    """The chosen candidate."""
    meets_target: bool
    """False when no candidate passed and the safest one was taken instead."""
    scores: list[dict]
    """Every candidate's statistic, in the candidates' order."""


def select(candidates: list[Candidate], reference_correct: np.ndarray, rule: SelectionRule) -> Selection:
    """The cheapest candidate (by ``Candidate.cost``: FLOPs unless a family prices otherwise) that passes
    ``rule`` (ties: the better statistic).

    When none passes, the safest candidate is taken (highest calibration accuracy, or fewest
    disagreements in certified mode; ties: the cheaper) and ``meets_target`` is False.
    """
    if not candidates:
        raise ValueError("no candidates to select from")
    scores = [score(c, reference_correct, rule) for c in candidates]
    safety = [s["delta_pp"] if rule.mode == "empirical" else -s["disagreement"] for s in scores]
    passing = [i for i, s in enumerate(scores) if s["passes"]]
    if passing:
        best = min(passing, key=lambda i: (scores[i]["cost"], -safety[i]))
        return Selection(best, True, scores)
    best = min(range(len(candidates)), key=lambda i: (-safety[i], scores[i]["cost"]))
    return Selection(best, False, scores)
