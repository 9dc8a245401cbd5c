"""Calibrate a price-conditioned policy on a user's own unlabeled images.

The backbone runs every configuration on the images once (an outcome table with no labels);
the policy acts at each price of its grid; each price's disagreement with the full
configuration gets its ``1 - delta`` Clopper-Pearson bound; the curve of operating points
goes into the artifact, and the price is the cheapest one certified at the tolerance by
fixed-sequence testing from the lowest price (``policy.selection.certified_point``). No
label is read at any step, so the images can come straight from deployment.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from backbone import AdaPerceiver
from backbone.errors import ProjectError
from backbone.folders import ImageFiles
from envs import OutcomeTable, build_outcome_table
from envs.price import GRID
from policy.artifact import PolicyArtifact, policy_outcome, price_knobs
from policy.second_look import glance_action, second_look_cost
from policy.selection import (
    NothingCertifiedError,
    OperatingPoint,
    Outcome,
    SelectionRule,
    candidate,
    certified_point,
    images_to_certify,
    operating_points,
)


class CalibrationError(ProjectError):
    """Calibration cannot certify anything with these images or this policy."""


def unlabeled_table(model: AdaPerceiver, images: torch.Tensor | ImageFiles, artifact: PolicyArtifact,
                    progress: bool = False) -> OutcomeTable:
    """Every configuration's prediction on ``images`` ``(n, C, H, W)`` (or image files, streamed); its labels are
    placeholders (-1), never read by the certified rule."""
    placeholder = torch.full((len(images),), -1, dtype=torch.int64)
    table = build_outcome_table(model, images, placeholder.clamp(min=0), artifact.feature_spec,
                                meta={"split": "unlabeled"}, progress=progress)
    return dataclasses.replace(table, labels=placeholder.numpy())


def price_curve(artifact: PolicyArtifact, table: OutcomeTable, delta: float, grid: int = GRID,
                latency_ms: np.ndarray | None = None) -> list[OperatingPoint]:
    """The operating point of each price of the policy's grid on ``table`` (lowest price first).

    ``latency_ms``: a ``(K, L, M)`` grid of staged ms per input (a latency table), for the points' ``ms``."""
    if not artifact.price.conditioned:
        raise CalibrationError("this policy was trained at one fixed price, so there is no price to calibrate; "
                               "train a price-conditioned one (experiments/train_policy.py --lam-range LOW,HIGH)")
    network = artifact.network_flops()
    knobs = price_knobs([artifact], grid)
    outcomes = [policy_outcome(artifact, table, knob.lam, network) for knob in knobs]
    scored = [candidate(knob, outcome, table) for knob, outcome in zip(knobs, outcomes, strict=True)]
    ms = None if latency_ms is None else [float(np.mean(staged_ms(latency_ms, o, artifact))) for o in outcomes]
    return operating_points(scored, delta, ms)


def calibrate(artifact: PolicyArtifact, table: OutcomeTable, rule: SelectionRule, source: str,
              latency_ms: np.ndarray | None = None) -> tuple[PolicyArtifact, OperatingPoint]:
    """A copy of ``artifact`` whose price is the cheapest certified at ``rule.tolerance_pp`` on ``table``, with the
    whole operating-point curve in its ``meta``; refuses with a ``CalibrationError`` what cannot be certified."""
    if rule.mode != "certified":
        raise CalibrationError(f"unlabeled images can only calibrate the certified (disagreement) rule, not {rule.mode!r}")
    need = images_to_certify(rule.tolerance_pp, rule.delta)
    if need < 0:
        raise CalibrationError("a tolerance of 0% can never be certified on finitely many images; ask for > 0")
    if len(table) < need:
        raise CalibrationError(
            f"{len(table)} images cannot certify a disagreement of {rule.tolerance_pp:g}% at delta {rule.delta:g}: "
            f"even with no disagreement at all that needs at least {need} images; give more images or ask for a "
            f"tolerance of at least {100 * (1 - rule.delta ** (1 / len(table))):.3g}%")
    points = price_curve(artifact, table, rule.delta, latency_ms=latency_ms)
    try:
        chosen = certified_point(points, rule.tolerance_pp)
    except NothingCertifiedError as err:
        raise CalibrationError(str(err)) from err
    meta = {**artifact.meta, "lam": chosen.lam, "selection": rule.to_dict(), "meets_target": True,
            "calibration_disagreement": chosen.disagreement, "calibration_bound_pp": 100 * chosen.bound,
            "calibration_delta_pp": None,
            "operating_points": {"calibrated_on": source, "labels_read": False, "n": len(table),
                                 "points": [p.to_dict() for p in points]}}
    return dataclasses.replace(artifact, meta=meta), chosen


def staged_ms(latency_ms: np.ndarray, outcome: Outcome, artifact: PolicyArtifact) -> np.ndarray:
    """``(n,)`` staged ms of each input of ``outcome`` on a ``(K, L, M)`` grid: its action, and the second look's
    extension from the glance to the full configuration where it looked again."""
    ms = latency_ms[tuple(outcome.actions.T)]
    if outcome.looked_again is None:
        return ms
    glance = glance_action(artifact.feature_spec, artifact.meta["token_grans"], artifact.meta["ffn_widths"])
    return ms + outcome.looked_again * second_look_cost(latency_ms, glance)
