"""The one selection rule and the families that use it, on small tables with a known answer.

Each test is built so that inverting a choice (cheapest <-> dearest, min <-> max, the order of
thresholds, certified <-> empirical statistic) picks another candidate and fails.
"""

import numpy as np
import pytest
from conftest import synthetic_table
from scipy.stats import binom

from evaluation.families import EarlyExitFamily, FixedFamily, GlanceThresholdFamily, choose_and_apply
from evaluation.report import SelectionRun, run_family, split_halves
from policy.selection import Candidate, SelectionRule, disagreement_upper_bound, select


def candidate(knob, n_wrong: int, n_disagree: int, flops: float, n: int = 1000) -> Candidate:
    correct = np.ones(n, bool)
    correct[:n_wrong] = False
    agree = np.ones(n, bool)
    agree[n - n_disagree :] = False
    return Candidate(knob, correct, agree, flops)


REFERENCE = np.ones(1000, bool)  # the full configuration is right on every calibration input


def test_empirical_rule_takes_the_cheapest_passing_candidate():
    # tolerance 0.3 pp, margin 0.1 pp: a drop of at most 0.2 pp = 2 of 1,000 inputs passes
    rule = SelectionRule("empirical", tolerance_pp=0.3, margin_pp=0.1)
    pool = [
        candidate("cheap-but-bad", n_wrong=3, n_disagree=0, flops=10),  # 0.3 pp drop: fails (margin)
        candidate("dear", n_wrong=0, n_disagree=0, flops=100),
        candidate("cheapest-passing", n_wrong=2, n_disagree=0, flops=40),
        candidate("middle", n_wrong=1, n_disagree=0, flops=60),
    ]
    chosen = select(pool, REFERENCE, rule)
    assert pool[chosen.index].knob == "cheapest-passing" and chosen.meets_target
    assert [s["passes"] for s in chosen.scores] == [False, True, True, True]
    # without the margin the cheap one passes: the margin is applied, not ignored
    assert pool[select(pool, REFERENCE, SelectionRule("empirical", 0.3, 0.0)).index].knob == "cheap-but-bad"


def test_ties_in_flops_go_to_the_better_statistic():
    pool = [candidate("worse", 2, 0, 50), candidate("better", 0, 0, 50)]
    assert pool[select(pool, REFERENCE, SelectionRule("empirical", 0.3, 0.1)).index].knob == "better"


def test_certified_rule_bounds_disagreement_and_ignores_labels():
    rule = SelectionRule("certified", tolerance_pp=0.5, delta=0.1)
    # 1,000 inputs: 1 disagreement has a 90% upper bound of 0.39% (passes), 3 have 0.67% (fails)
    assert disagreement_upper_bound(1, 1000, 0.1) < 0.005 < disagreement_upper_bound(3, 1000, 0.1)
    pool = [
        candidate("wrong-but-agreeing", n_wrong=50, n_disagree=0, flops=30),  # labels say bad; agreement is perfect
        candidate("three-disagree", n_wrong=0, n_disagree=3, flops=10),
        candidate("one-disagrees", n_wrong=0, n_disagree=1, flops=20),
    ]
    chosen = select(pool, REFERENCE, rule)
    assert pool[chosen.index].knob == "one-disagrees"
    # the empirical rule reads the labels instead and passes the cheapest candidate
    assert pool[select(pool, REFERENCE, SelectionRule("empirical", 0.5, 0.1)).index].knob == "three-disagree"


def test_clopper_pearson_bound_is_exact():
    # the bound u solves P(Binomial(n, u) <= k) = delta
    for k, n in ((0, 50), (2, 500), (10, 6000)):
        u = disagreement_upper_bound(k, n, 0.1)
        assert binom.cdf(k, n, u) == pytest.approx(0.1, abs=1e-9)
        assert disagreement_upper_bound(k, n, 0.05) > u  # more confidence, a looser bound
    assert disagreement_upper_bound(5, 5, 0.1) == 1.0


def test_when_nothing_passes_the_safest_candidate_is_taken():
    pool = [candidate("cheap", 9, 9, 10), candidate("safest", 5, 5, 90), candidate("mid", 7, 7, 50)]
    for rule in (SelectionRule("empirical", 0.1, 0.1), SelectionRule("certified", 0.1)):
        chosen = select(pool, REFERENCE, rule)
        assert pool[chosen.index].knob == "safest" and not chosen.meets_target


def test_rule_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        SelectionRule("median")
    with pytest.raises(ValueError, match="delta"):
        SelectionRule("certified", delta=0)


def test_fixed_family_picks_the_cheapest_configuration_within_tolerance():
    # 1,000 inputs, grid (2, 2, 1): flops 100, 200 (k=0) and 200, 400 (k=1)
    correct = np.ones((1000, 2, 2, 1), bool)
    correct[:10, 0, 0, 0] = False  # 1 pp drop: out
    correct[:1, 0, 1, 0] = False  # 0.1 pp drop: in with tolerance 0.2, margin 0.1
    correct[:2, 1, 0, 0] = False  # 0.2 pp: out
    table = synthetic_table(correct)
    knob, selection, outcome = choose_and_apply(FixedFamily(table), table, table,
                                                SelectionRule("empirical", 0.2, 0.1))
    assert knob == (0, 1, 0) and selection.meets_target
    assert outcome.flops.mean() == 200


def test_early_exit_family_picks_the_cheapest_threshold_not_the_first():
    # depth 3 at full tokens/width; confidence rises with depth; the depth-1 exit is wrong on 5% of inputs
    n = 200
    correct = np.ones((n, 1, 3, 1), bool)
    correct[:10, 0, 0, 0] = False
    confidence = np.zeros((n, 1, 3, 1), np.float32)
    confidence[:, 0, 0, 0] = np.where(np.arange(n) < 10, 0.85, 0.95)  # the wrong ones are less confident
    confidence[:, 0, 1, 0], confidence[:, 0, 2, 0] = 0.97, 0.99
    table = synthetic_table(correct, confidence)
    family = EarlyExitFamily(0, readout_flops=5, taus=(0.99, 0.3, 0.9, 0.96))  # knob order must not matter
    tau, selection, outcome = choose_and_apply(family, table, table, SelectionRule("empirical", 0.1, 0.0))
    # tau 0.3 exits everyone at depth 1 (5% wrong); 0.9 exits the confident right ones at depth 1 and the rest at 2
    assert tau == 0.9 and selection.meets_target
    assert outcome.flops.mean() == pytest.approx((190 * 100 + 10 * (200 + 5)) / n)


def test_glance_threshold_answers_with_the_glance_only_when_confident():
    n = 100
    correct = np.ones((n, 2, 1, 1), bool)
    correct[:20, 0, 0, 0] = False
    confidence = np.ones((n, 2, 1, 1), np.float32)
    confidence[:, 0, 0, 0] = np.where(np.arange(n) < 20, 0.6, 0.99)
    staged = np.array([100, 250])[:, None, None]  # the glance; the full configuration after it
    table = synthetic_table(correct, confidence, staged=staged)
    family = GlanceThresholdFamily((0, 0, 0), taus=(0.5, 0.95, 0.999))
    tau, _, outcome = choose_and_apply(family, table, table, SelectionRule("empirical", 0.1, 0.0))
    assert tau == 0.95
    assert outcome.flops.tolist() == [250] * 20 + [100] * 80
    assert (outcome.predicted == 0).all()


def test_cross_fitting_calibrates_on_one_half_and_measures_on_the_other():
    # the glance disagrees with the full configuration on half A only: calibrated on A it is refused for B, and
    # calibrated on B it is taken for A, where it loses; cross-fitting shows that loss instead of hiding it
    n = 2000
    table0 = synthetic_table(np.ones((n, 2, 1, 1), bool))
    first, second = split_halves(table0)
    assert len(np.intersect1d(first, second)) == 0 and len(first) + len(second) == n
    agree = np.ones((n, 2, 1, 1), bool)
    agree[first[:40], 0, 0, 0] = False
    table = synthetic_table(np.ones((n, 2, 1, 1), bool), agree=agree)
    run = SelectionRun(SelectionRule("certified", tolerance_pp=1.0), "test_halves")
    outcome, records = run_family(FixedFamily(table), run, table, table, split_halves(table))
    assert [r["index"] for r in records] == [[1, 0, 0], [0, 0, 0]]  # calibrated on A: full; on B: the glance
    assert [r["evaluated_on"] for r in records] == [n // 2, n // 2]
    disagree = outcome.predicted != table.predicted[:, -1, -1, -1]
    assert disagree[first].sum() == 40 and disagree[second].sum() == 0
