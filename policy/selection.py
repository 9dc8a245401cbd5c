"""One selection rule for every family: fixed-sequence testing of candidates ordered safest first.

A family (fixed configurations, early-exit thresholds, random mixes, router margins, PPO
prices) offers its candidates in an order fixed before any calibration input is read, the
safest first (the most compute: the lowest price, the highest threshold, the dearest
configuration). Each candidate in turn is tested on the calibration inputs; the first that
fails stops the sequence, and the choice is the cheapest candidate before it. This is
fixed-sequence testing (Learn-then-Test, Angelopoulos et al. 2021): every candidate before
the first failure keeps the promise at once with probability ``1 - delta``, so taking the
cheapest of them is valid. Taking the cheapest candidate that passes *anywhere* is not: with
many candidates, one whose true statistic is past the tolerance passes by chance far more
often than ``delta`` (``tests/test_selection.py`` simulates both).

What a test checks, by mode:

- ``certified`` (no labels): the one-sided ``1 - delta`` Clopper-Pearson upper bound on the
  share of inputs whose prediction differs from the full configuration's is at most
  ``tolerance_pp`` (CATs, EMNLP 2021; CALM, NeurIPS 2022). Disagreement bounds the accuracy
  loss, so it can be calibrated on unlabeled images of the deployment distribution.
- ``certified_accuracy`` (labels): the same bound on the share of inputs the full
  configuration gets right and the candidate gets wrong ("lost"). The accuracy drop is lost
  minus gained, so this bounds the drop itself, and it is never looser than the disagreement
  bound.
- ``point_estimate`` (labels): the calibration accuracy drop is at most ``tolerance_pp -
  margin_pp``. A point estimate with a margin, not a bound: nothing says how often it fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import beta

from backbone.errors import ProjectError
from envs import OutcomeTable

MODES = ("certified", "certified_accuracy", "point_estimate")
ALIASES = {"empirical": "point_estimate"}
"""Older name of a mode, still accepted (artifacts and scripts written before it was renamed)."""


@dataclass(frozen=True)
class SelectionRule:
    """What "keeps the promise" means for one candidate on calibration inputs."""

    mode: str = "point_estimate"
    """'certified' (bound on disagreement, no labels), 'certified_accuracy' (bound on the accuracy drop, labels)
    or 'point_estimate' (the calibration accuracy drop, labels)."""
    tolerance_pp: float = 0.1
    """Largest disagreement (certified) or accuracy drop (the other modes) allowed, in percentage points."""
    margin_pp: float = 0.1
    """Point-estimate mode: the calibration drop must be at most ``tolerance_pp - margin_pp``."""
    delta: float = 0.1
    """Certified modes: the bound holds with probability ``1 - delta`` (for the whole sequence of tests)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", ALIASES.get(self.mode, self.mode))
        if self.mode not in MODES:
            raise ValueError(f"selection mode must be one of {MODES}, got {self.mode!r}")
        for name in ("tolerance_pp", "margin_pp", "delta"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.tolerance_pp < 0 or self.margin_pp < 0:
            raise ValueError(f"tolerance and margin must be >= 0 pp, got {self.tolerance_pp}, {self.margin_pp}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def certified(self) -> bool:
        """Whether the rule tests a (1 - delta) bound rather than a point estimate."""
        return self.mode != "point_estimate"

    @property
    def statistic(self) -> str:
        """What the rule bounds or estimates: 'disagreement' or 'accuracy drop'."""
        return "disagreement" if self.mode == "certified" else "accuracy drop"

    def to_dict(self) -> dict:
        keep = ("mode", "tolerance_pp", "delta") if self.certified else ("mode", "tolerance_pp", "margin_pp")
        return {key: value for key, value in asdict(self).items() if key in keep} | {
            "statistic": self.statistic, "procedure": "fixed_sequence"}


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
    """``(n, 3)`` the grid point each input's answer is computed at (None where the family does not say); for an
    input the second look sent on (``looked_again``), the grid point of its first extension."""
    looked_again: np.ndarray | None = None
    """``(n,)`` bool: inputs the second look (``policy.second_look``) answered with the full configuration, extended
    from the glance on top of their action (None: no second look)."""

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
    if rule.mode == "certified":
        bound = disagreement_upper_bound(disagreements, n, rule.delta)
        out.update(disagreement_bound=bound, passes=bool(bound <= rule.tolerance_pp / 100 + 1e-12))
        return out
    drop_pp = 100 * (reference_correct.mean() - candidate.correct.mean())
    out["delta_pp"] = -float(drop_pp)
    if rule.mode == "certified_accuracy":
        lost = int(np.sum(reference_correct & ~candidate.correct))
        bound = disagreement_upper_bound(lost, n, rule.delta)
        out.update(lost=lost / max(n, 1), drop_bound_pp=100 * bound, passes=bool(bound <= rule.tolerance_pp / 100 + 1e-12))
    else:
        out["passes"] = bool(drop_pp <= rule.tolerance_pp - rule.margin_pp + 1e-9)
    return out


def describe_score(stats: dict, rule: SelectionRule) -> str:
    """One phrase for a candidate's calibration statistic in the rule's own vocabulary."""
    confidence = f"{100 * (1 - rule.delta):g}%"
    if rule.mode == "certified":
        return (f"calibration disagreement {100 * stats['disagreement']:.2f}%, {confidence} bound "
                f"{100 * stats['disagreement_bound']:.3f}% (tolerance {rule.tolerance_pp:g}%)")
    drop = f"calibration accuracy change {stats['delta_pp'] + 0.0:+.2f} pp"  # + 0.0: no "-0.00"
    if rule.mode == "certified_accuracy":
        return f"{drop}, {confidence} bound {stats['drop_bound_pp']:.3f} pp (tolerance {rule.tolerance_pp:g} pp)"
    return (f"{drop} (a point estimate; a drop of at most {rule.tolerance_pp - rule.margin_pp:g} pp = tolerance "
            f"{rule.tolerance_pp:g} - margin {rule.margin_pp:g} passes)")


@dataclass
class Selection:
    """The rule's choice among a family's candidates."""

    index: int
    """The chosen candidate."""
    meets_target: bool
    """False when the first (safest) candidate failed: nothing was certified, and the first is taken."""
    scores: list[dict]
    """Every candidate's statistic, in the candidates' (safest-first) order; ``tested`` says which the
    sequence reached."""
    tested: int
    """How many candidates the sequence tested: those before the first failure, and that failure."""


def passing_prefix(passes: list[bool]) -> int:
    """How many candidates, taken in order, pass before the first failure: the set fixed-sequence testing certifies."""
    for i, ok in enumerate(passes):
        if not ok:
            return i
    return len(passes)


def select(candidates: list[Candidate], reference_correct: np.ndarray, rule: SelectionRule) -> Selection:
    """Fixed-sequence testing over ``candidates``, given safest first in an order fixed before the calibration
    inputs were read: test each in turn, stop at the first that fails, and take the cheapest (by
    ``Candidate.cost``: FLOPs unless a family prices otherwise; ties: the earlier) of those before it.

    When the first candidate fails nothing is certified: it is taken (the safest by the family's own order)
    and ``meets_target`` is False. Every candidate is scored (for the record); only the tested prefix decides.
    """
    if not candidates:
        raise ValueError("no candidates to select from")
    scores = [score(c, reference_correct, rule) for c in candidates]
    passed = passing_prefix([s["passes"] for s in scores])
    tested = min(passed + 1, len(scores))
    for i, s in enumerate(scores):
        s["tested"] = i < tested
    if passed == 0:
        return Selection(0, False, scores, tested)
    best = min(range(passed), key=lambda i: (scores[i]["cost"], i))
    return Selection(best, True, scores, tested)


class PriceKnob(NamedTuple):
    """The knob of a PPO candidate: which trained artifact, acting at which FLOP price."""

    artifact: int
    lam: float


@dataclass(frozen=True)
class OperatingPoint:
    """One price of a price-conditioned policy, measured on calibration inputs (labels not read)."""

    lam: float
    """The FLOP price."""
    mflops: float
    """Mean MFLOPs per input at this price, every cost counted."""
    disagreement: float
    """Share of the calibration inputs whose prediction differs from the full configuration's."""
    bound: float
    """One-sided ``1 - delta`` Clopper-Pearson upper bound on that share."""
    n: int
    """Calibration inputs."""
    delta: float
    ms: float | None = None
    """Mean ms per input from a latency table (None without one)."""

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def operating_points(candidates: list[Candidate], delta: float, ms: list[float] | None = None) -> list[OperatingPoint]:
    """The curve of a price-conditioned policy: one point per candidate (knob a ``PriceKnob``), lowest price
    first, each with its disagreement bound at ``delta``."""
    points = []
    for i, c in enumerate(candidates):
        n, k = len(c.agree), int(np.sum(~c.agree))
        points.append(OperatingPoint(float(PriceKnob(*c.knob).lam), c.flops / 1e6, k / max(n, 1), disagreement_upper_bound(k, n, delta),
                                     n, float(delta), None if ms is None else float(ms[i])))
    return sorted(points, key=lambda p: p.lam)


class NothingCertifiedError(ProjectError):
    """No operating point is certified at the tolerance asked for."""


def points_of(meta: dict) -> list[OperatingPoint]:
    """The operating points a policy artifact's ``meta`` carries (empty when it carries none)."""
    return [OperatingPoint(**point) for point in (meta.get("operating_points") or {}).get("points", [])]


def certified_point(points: list[OperatingPoint], tolerance_pp: float) -> OperatingPoint:
    """The cheapest operating point certified at ``tolerance_pp`` (disagreement, pp) by fixed-sequence testing
    along the curve, lowest price first; ``NothingCertifiedError`` when the first point's bound is already
    above the tolerance."""
    if not math.isfinite(tolerance_pp) or tolerance_pp < 0:
        raise NothingCertifiedError(f"a tolerance must be a finite number of pp >= 0, got {tolerance_pp}")
    if not points:
        raise NothingCertifiedError("this policy carries no operating points; calibrate it with experiments/calibrate.py")
    ordered = sorted(points, key=lambda p: p.lam)
    passed = ordered[: passing_prefix([p.bound <= tolerance_pp / 100 + 1e-12 for p in ordered])]
    if not passed:
        first = ordered[0]
        raise NothingCertifiedError(
            f"no operating point is certified at a disagreement of {tolerance_pp:g}%: at the safest price the "
            f"{100 * (1 - first.delta):g}% bound is {100 * first.bound:.3g}% on {first.n} calibration images; ask for "
            f"a tolerance of at least {100 * first.bound:.3g}%, or calibrate on more images (a tolerance of "
            f"{tolerance_pp:g}% needs at least {images_to_certify(tolerance_pp, first.delta)} with no disagreement)")
    return min(passed, key=lambda p: (p.mflops, p.lam))


def images_to_certify(tolerance_pp: float, delta: float) -> int:
    """The fewest inputs on which zero disagreements certify ``tolerance_pp`` at ``delta``:
    ``(1 - t)^n <= delta``."""
    t = tolerance_pp / 100
    if t <= 0:
        return -1
    if t >= 1:
        return 1
    return math.ceil(math.log(delta) / math.log1p(-t))
