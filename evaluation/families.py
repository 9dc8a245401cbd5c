"""The families compared in the report, each a set of candidates judged by one selection rule.

A family maps an outcome table and one of its knobs to an ``Outcome``: each input's
predicted class and its FLOPs, every cost counted where it is paid, and the grid point its
answer is computed at (``Outcome.actions``, timed with a latency table's ``fresh_ms`` or
``staged_ms`` as the family's ``timing`` says). ``choose_and_apply`` picks the knob on
calibration inputs with ``policy.selection.select`` and applies it to evaluation inputs: the same
code for every family and every selection mode.

``knobs()`` lists a family's candidates safest first, in an order that depends on nothing but the
family's settings and the analytic FLOP grid, so that it is fixed before a calibration input is
read (fixed-sequence testing needs that): the lowest price first, the highest threshold first, the
smallest router margin first, the largest random share first. Fixed configurations have no single
natural order, so they go by FLOPs, the dearest first (by the family's cost grid when it has one).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from envs import OutcomeTable
from envs.price import GRID
from evaluation.baselines import early_exit, matched_random_actions
from policy.artifact import PolicyArtifact, policy_outcome, price_knobs
from policy.selection import Candidate, Outcome, PriceKnob, Selection, SelectionRule, candidate, select

TAUS = tuple(np.round(np.concatenate([np.linspace(0.3, 0.9, 13), [0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]]), 4))
GLANCE_TAUS = tuple(np.round(np.concatenate([np.linspace(0.3, 0.9, 13), 1 - np.geomspace(0.08, 1e-5, 25), [1.0]]), 6))
EPSILONS = tuple(np.round(np.geomspace(1e-4, 0.3, 40), 6))
RANDOM_FRACTIONS = tuple(np.round(np.linspace(0.02, 1.0, 50), 3))


class Family(Protocol):
    name: str
    timing: str
    """'fresh' (each answer is one fresh pass at its action) or 'staged' (the glance, then its extension)."""

    def knobs(self) -> list: ...

    def outcome(self, table: OutcomeTable, knob: Any) -> Outcome: ...

    def describe(self, knob: Any) -> dict: ...


class FixedFamily:
    """One configuration for every input (a fresh pass; no glance).

    ``cost``: a ``(K, L, M)`` grid to rank the configurations by instead of FLOPs (e.g. measured fresh ms).
    """

    name = "fixed"
    timing = "fresh"

    def __init__(self, table: OutcomeTable, cost: np.ndarray | None = None) -> None:
        self.grid_shape, self.configuration, self.flops = table.grid_shape, table.configuration, table.flops
        self.cost = None if cost is None else np.asarray(cost, dtype=np.float64)

    def knobs(self) -> list:
        price = self.flops if self.cost is None else self.cost
        return sorted(np.ndindex(*self.grid_shape), key=lambda knob: (-float(price[knob]), knob))

    def outcome(self, table: OutcomeTable, knob) -> Outcome:
        n = len(table)
        cost = None if self.cost is None else np.full(n, float(self.cost[knob]))
        return Outcome(table.predicted[:, knob[0], knob[1], knob[2]], np.full(n, float(table.flops[knob])), cost,
                       np.tile(np.asarray(knob, dtype=np.int64), (n, 1)))

    def describe(self, knob) -> dict:
        return {"index": [int(i) for i in knob], "config": list(self.configuration(knob))}


class EarlyExitFamily:
    """Full tokens at one width; exit at the first depth whose max softmax >= tau (readouts charged)."""

    name = "early_exit"
    timing = "fresh"  # actions: the exit depth at full tokens; the readouts before it are not a grid point

    def __init__(self, width_index: int, readout_flops: float, taus: tuple[float, ...] = TAUS) -> None:
        self.width_index, self.readout_flops, self.taus = width_index, readout_flops, taus

    def knobs(self) -> list:
        return sorted(self.taus, reverse=True)

    def outcome(self, table: OutcomeTable, knob) -> Outcome:
        result = early_exit(table, knob, self.width_index, self.readout_flops)
        depth = result["exit_index"]
        actions = np.stack([np.full_like(depth, table.grid_shape[0] - 1), depth, np.full_like(depth, self.width_index)],
                           axis=1)
        return Outcome(result["predicted"], result["flops_per_input"].astype(np.float64), actions=actions)

    def describe(self, knob) -> dict:
        return {"tau": float(knob)}


class RandomFamily:
    """Random configurations (maximum entropy at a mean FLOP target, a share of the full configuration's)."""

    name = "random"
    timing = "fresh"

    def __init__(self, seed: int = 0, fractions: tuple[float, ...] = RANDOM_FRACTIONS) -> None:
        self.seed, self.fractions = seed, fractions

    def knobs(self) -> list:
        return sorted(self.fractions, reverse=True)

    def outcome(self, table: OutcomeTable, knob) -> Outcome:
        actions = matched_random_actions(table, knob * table.full_flops, self.seed)
        return Outcome(table.predictions(actions), table.flops[tuple(actions.T)].astype(np.float64), actions=actions)

    def describe(self, knob) -> dict:
        return {"target_flop_fraction": float(knob)}


class _StagedFamily:
    """A family that picks per-input actions after the glance: costs are the table's staged FLOPs."""

    timing = "staged"

    def __init__(self) -> None:
        self._memo: dict[tuple[int, Any], np.ndarray] = {}

    def actions(self, table: OutcomeTable, knob) -> np.ndarray:
        raise NotImplementedError

    def overhead_flops(self, knob) -> float:
        """FLOPs per input of the chooser itself (beyond the glance, which staged FLOPs include)."""
        return 0.0

    def outcome(self, table: OutcomeTable, knob) -> Outcome:
        key = (id(table), knob)
        if key not in self._memo:
            self._memo[key] = self.actions(table, knob)
        actions = self._memo[key]
        return Outcome(table.predictions(actions), table.staged_flops[tuple(actions.T)] + self.overhead_flops(knob),
                       actions=actions)


class GlanceThresholdFamily(_StagedFamily):
    """Answer with the glance when its max probability >= tau, else run the full configuration."""

    name = "glance_threshold"

    def __init__(self, glance_index: tuple[int, int, int], taus: tuple[float, ...] = GLANCE_TAUS) -> None:
        super().__init__()
        self.glance_index, self.taus = glance_index, taus

    def knobs(self) -> list:
        return sorted(self.taus, reverse=True)

    def actions(self, table: OutcomeTable, knob) -> np.ndarray:
        confident = table.confidence[(slice(None), *self.glance_index)] >= knob
        full = np.array(table.grid_shape) - 1
        return np.where(confident[:, None], np.array(self.glance_index), full)

    def describe(self, knob) -> dict:
        return {"tau": float(knob)}


class RouterFamily(_StagedFamily):
    """Supervised router: predict each configuration's agreement with the full one from the policy features,
    then take the cheapest (staged FLOPs) predicted to agree with probability >= 1 - epsilon.

    A scikit-learn ``MLPClassifier`` (multi-label, one output per configuration) trained on the
    policy-train table; its FLOPs per input are charged.
    """

    name = "router"

    def __init__(self, train: OutcomeTable, hidden: int = 64, seed: int = 0,
                 epsilons: tuple[float, ...] = EPSILONS) -> None:
        super().__init__()
        self.epsilons = epsilons
        self.grid_shape = train.grid_shape
        order = np.argsort(train.staged_flops.reshape(-1), kind="stable")
        self.order = order[order != train.staged_flops.size - 1]  # the full configuration is the fallback
        targets = train.agree.reshape(len(train), -1)[:, self.order]
        # early stopping scores a held-out tenth of the rows: a tiny policy-train split (a small image folder)
        # leaves too few to score, so it trains for max_iter instead
        self.model = make_pipeline(StandardScaler(), MLPClassifier((hidden,), max_iter=300, random_state=seed,
                                                                   early_stopping=len(train) >= 50))
        self.model.fit(train.features, targets)
        n_features, n_out = train.features.shape[1], len(self.order)
        self.network_flops = float(2 * (n_features * hidden + hidden * n_out))
        self._proba: dict[int, np.ndarray] = {}

    def overhead_flops(self, knob) -> float:
        return self.network_flops

    def knobs(self) -> list:
        return sorted(self.epsilons)

    def actions(self, table: OutcomeTable, knob) -> np.ndarray:
        if id(table) not in self._proba:
            self._proba[id(table)] = np.asarray(self.model.predict_proba(table.features))
        ok = self._proba[id(table)] >= 1 - knob  # (n, candidates), cheapest first
        first = np.where(ok.any(axis=1), ok.argmax(axis=1), -1)
        flat = np.where(first >= 0, self.order[np.maximum(first, 0)], int(np.prod(self.grid_shape)) - 1)
        return np.stack(np.unravel_index(flat, self.grid_shape), axis=1)

    def describe(self, knob) -> dict:
        return {"epsilon": float(knob)}


class PolicyFamily(_StagedFamily):
    """PPO policies: each artifact of a sweep, or one price-conditioned artifact at each price of a grid
    (``Price.grid``); a knob is a ``PriceKnob`` ``(artifact, lam)``.

    ``cost``: a ``(K, L, M)`` grid (a latency table's staged ms) by which the prices of artifacts trained on
    latency (``meta["cost"] == 'latency'``) are ranked, as their training's calibration ranked them; the
    prices of FLOP-priced artifacts, or of every artifact without ``cost``, are ranked by FLOPs.
    """

    name = "ppo"

    def __init__(self, artifacts: list[PolicyArtifact], lam_grid: int = GRID, cost: np.ndarray | None = None) -> None:
        super().__init__()
        self.artifacts = artifacts
        self.costs = [cost if cost is not None and artifact.meta.get("cost") == "latency" else None
                      for artifact in artifacts]
        self._knobs = price_knobs(artifacts, lam_grid)  # the lowest price first
        self.network_flops = [artifact.network_flops() for artifact in artifacts]

    def knobs(self) -> list:
        return list(self._knobs)

    def outcome(self, table: OutcomeTable, knob) -> Outcome:
        i, lam = knob = PriceKnob(*knob)
        key = (id(table), knob)
        if key not in self._memo:
            self._memo[key] = policy_outcome(self.artifacts[i], table, lam, self.network_flops[i], self.costs[i])
        return self._memo[key]

    def describe(self, knob) -> dict:
        knob = PriceKnob(*knob)
        return {"artifact": knob.artifact, "lam": knob.lam,
                "cost": self.artifacts[knob.artifact].meta.get("cost", "flops")}


def candidates(family: Family, table: OutcomeTable) -> list[Candidate]:
    """Every knob of ``family`` scored on ``table``."""
    return [candidate(knob, family.outcome(table, knob), table) for knob in family.knobs()]


def choose_and_apply(family: Family, calibration: OutcomeTable, evaluation: OutcomeTable,
                     rule: SelectionRule) -> tuple[Any, Selection, Outcome]:
    """The knob ``rule`` picks on ``calibration``, its selection record, and its outcome on ``evaluation``."""
    scored = candidates(family, calibration)
    selection = select(scored, calibration.correct[:, -1, -1, -1], rule)
    knob = scored[selection.index].knob
    return knob, selection, family.outcome(evaluation, knob)
