"""Ranking glances: the answered share and the cascade cut on a table whose answers are known."""

import dataclasses

import numpy as np
from conftest import synthetic_table

from backbone import cascade_flops, flops, flops_grid
from evaluation.glances import rank_glances


def known_table(tiny_config):
    """Ten inputs. The one-block glance (2, 1, 0.25) disagrees with the full model at confidence ranks 3 and 7
    (1-based); the two-block glance (2, 2, 0.25) only at rank 10. Every other configuration agrees everywhere."""
    n, shape = 10, tiny_config.grid_shape
    agree = np.ones((n, *shape), bool)
    confidence = np.ones((n, *shape), np.float32)
    ranked = np.linspace(0.99, 0.5, n, dtype=np.float32)  # rank r (0-based) has the r-th largest confidence
    rows = np.random.default_rng(0).permutation(n)  # so that the row order is not the confidence order
    confidence[rows, 0, 0, 0] = ranked
    confidence[rows, 0, 1, 0] = ranked
    agree[rows[[2, 6]], 0, 0, 0] = False
    agree[rows[9], 0, 1, 0] = False
    table = synthetic_table(np.ones((n, *shape), bool), confidence=confidence, agree=agree)
    return dataclasses.replace(table, token_grans=tiny_config.token_grans, ffn_widths=tiny_config.ffn_widths,
                               flops=flops_grid(tiny_config).numpy())


def by_glance(rankings):
    return {tuple(r.glance): r for r in rankings}


def test_answered_share_counts_the_confident_inputs_before_the_allowed_disagreements(tiny_config):
    table = known_table(tiny_config)
    one, none = by_glance(rank_glances(table, tiny_config, 1, 1.0)), by_glance(rank_glances(table, tiny_config, 0, 1.0))
    assert one[(2, 1, 0.25)].answered_share == 0.6 and none[(2, 1, 0.25)].answered_share == 0.2
    assert one[(2, 2, 0.25)].answered_share == 1.0 and none[(2, 2, 0.25)].answered_share == 0.9
    assert one[(2, 1, 0.25)].agreement == 0.8 and one[(2, 2, 0.25)].agreement == 0.9
    # the cut, from the backbone's own counts: answered inputs pay the glance, the rest the glance and its extension
    full = flops(tiny_config)
    glance, to_full = flops(tiny_config, 2, 1, 0.25), int(cascade_flops(tiny_config, (2, 1, 0.25))[-1, -1, -1])
    expected = 1 - (0.6 * glance + 0.4 * to_full) / full
    assert np.isclose(one[(2, 1, 0.25)].cascade_flop_reduction, expected)
    assert np.isclose(one[(2, 1, 0.25)].cost_share, glance / full)


def test_a_glance_that_ranks_its_mistakes_last_ranks_first(tiny_config):
    # (2, 2, 0.25) costs more than (2, 1, 0.25) but answers everything; swap which one ranks its mistakes last and
    # the order flips
    table = known_table(tiny_config)
    order = [tuple(r.glance) for r in rank_glances(table, tiny_config, 0, 1.0)]
    assert order.index((2, 2, 0.25)) < order.index((2, 1, 0.25))
    flipped = table.confidence.copy()
    flipped[:, 0, 1, 0] = -flipped[:, 0, 1, 0]  # now its one mistake is its most confident answer
    order = [tuple(r.glance) for r in rank_glances(dataclasses.replace(table, confidence=flipped), tiny_config, 0, 1.0)]
    assert order.index((2, 2, 0.25)) > order.index((2, 1, 0.25))


def test_candidates_dearer_than_the_cap_are_left_out(tiny_config):
    table = known_table(tiny_config)
    cap = flops(tiny_config, 2, 1, 0.25) / flops(tiny_config)
    assert [tuple(r.glance) for r in rank_glances(table, tiny_config, 1, cap)] == [(2, 1, 0.25)]
