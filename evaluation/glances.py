"""Which glance to give a policy: how well each cheap configuration's confidence ranks the inputs it can answer.

A policy answers an input at the glance only where the glance agrees with the full model; the certified rule
allows about one disagreement per 5,000 inputs. So a glance is worth what the share of inputs it can answer
before its first few disagreements is worth, ranked by its own confidence, less what it costs. This reads one
outcome table (every configuration's prediction and confidence on every input), with no policy trained: it is a
screening figure for choosing the glance on calibration data, not a certified cut.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from backbone import AdaPerceiverConfig, cascade_flops, flops
from backbone.grid import GridPoint
from envs.outcome_table import OutcomeTable


@dataclass(frozen=True)
class GlanceRanking:
    """One candidate glance on one table."""

    glance: GridPoint
    cost_share: float
    """The glance's FLOPs as a share of the full configuration's."""
    agreement: float
    """Share of inputs on which the glance predicts what the full configuration predicts."""
    answered_share: float
    """Largest share of inputs, most confident first, holding at most ``max_disagreements`` disagreements."""
    cascade_flop_reduction: float
    """FLOP cut of answering that share at the glance and extending every other input to the full configuration."""

    def to_dict(self) -> dict:
        return {**asdict(self), "glance": list(self.glance)}


def rank_glances(table: OutcomeTable, config: AdaPerceiverConfig, max_disagreements: int = 1,
                 max_cost_share: float = 0.15) -> list[GlanceRanking]:
    """Every configuration costing at most ``max_cost_share`` of the full one, as a glance, best cascade cut first."""
    full = table.full_flops
    rankings = []
    for index in np.ndindex(*table.grid_shape):
        glance = GridPoint.from_action(index, table.token_grans, table.ffn_widths)
        cost = flops(config, *glance)
        if cost > max_cost_share * full:
            continue
        agree = table.agree[(slice(None), *index)]
        order = np.argsort(-table.confidence[(slice(None), *index)], kind="stable")
        disagreements = np.cumsum(~agree[order])
        answered = np.searchsorted(disagreements, max_disagreements + 1) / len(table)
        to_full = int(cascade_flops(config, glance)[-1, -1, -1])
        mean_cost = answered * cost + (1 - answered) * to_full
        rankings.append(GlanceRanking(glance, cost / full, float(agree.mean()), float(answered), 1 - mean_cost / full))
    return sorted(rankings, key=lambda r: -r.cascade_flop_reduction)
