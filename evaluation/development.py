"""Recipe search without the test split: each policy certified and measured on cross-fitted calibration halves.

The calibration split is cut in two halves without its labels; each policy's price is chosen
by the certified rule on one half and measured on the other, then the halves swap (as the
report does on test). Comparing recipes by these figures reads no test image, so test stays
read once, by the report of the recipe that ships.
"""

from __future__ import annotations

from envs import OutcomeTable
from envs.price import GRID
from evaluation.families import PolicyFamily
from evaluation.report import SelectionRun, run_family, split_halves
from policy.artifact import PolicyArtifact
from policy.selection import SelectionRule


def develop(artifact: PolicyArtifact, calibration: OutcomeTable, rule: SelectionRule, seed: int = 0,
            prices: int = GRID) -> dict:
    """One policy on ``calibration`` cross-fitted over its two unlabeled halves: the FLOP cut and the
    disagreement measured on each held-out half, and the prices chosen (``prices`` log-spaced over its range)."""
    halves = split_halves(len(calibration), seed)
    run = SelectionRun(rule, "test_halves")  # the halves of the table passed as "test": here, calibration's
    outcome, records = run_family(PolicyFamily([artifact], prices), run, calibration, calibration, halves)
    held_out = [record["held_out_disagreement"] for record in records]  # half 2, then half 1
    return {
        "flop_reduction": 1 - float(outcome.flops.mean()) / calibration.full_flops,
        "held_out_disagreement": held_out,
        "max_held_out_disagreement": max(held_out),
        "lams": [record["lam"] for record in records],
        "meets_target": [record["meets_target"] for record in records],
        "n": len(calibration),
        "prices": prices,
    }
