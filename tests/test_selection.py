"""The one selection rule and the families that use it, on small tables with a known answer.

Each test is built so that inverting a choice (cheapest <-> dearest, min <-> max, the order of
thresholds, certified <-> point-estimate statistic, the stop at the first failure) picks another candidate and fails.
"""

import numpy as np
import pytest
from conftest import synthetic_table
from scipy.stats import binom

from evaluation.families import EarlyExitFamily, FixedFamily, GlanceThresholdFamily, choose_and_apply
from evaluation.report import SelectionRun, run_family, split_halves
from policy.selection import (
    Candidate,
    NothingCertifiedError,
    OperatingPoint,
    SelectionRule,
    certified_point,
    disagreement_upper_bound,
    images_to_certify,
    score,
    select,
)


def candidate(knob, n_wrong: int, n_disagree: int, flops: float, n: int = 1000) -> Candidate:
    correct = np.ones(n, bool)
    correct[:n_wrong] = False
    agree = np.ones(n, bool)
    agree[n - n_disagree :] = False
    return Candidate(knob, correct, agree, flops)


REFERENCE = np.ones(1000, bool)  # the full configuration is right on every calibration input


def test_point_estimate_rule_takes_the_cheapest_candidate_before_the_first_failure():
    # tolerance 0.3 pp, margin 0.1 pp: a drop of at most 0.2 pp = 2 of 1,000 inputs passes; safest first
    rule = SelectionRule("point_estimate", tolerance_pp=0.3, margin_pp=0.1)
    pool = [
        candidate("dear", n_wrong=0, n_disagree=0, flops=100),
        candidate("middle", n_wrong=1, n_disagree=0, flops=60),
        candidate("cheapest-passing", n_wrong=2, n_disagree=0, flops=40),
        candidate("cheap-but-bad", n_wrong=3, n_disagree=0, flops=10),  # 0.3 pp drop: fails (margin)
    ]
    chosen = select(pool, REFERENCE, rule)
    assert pool[chosen.index].knob == "cheapest-passing" and chosen.meets_target and chosen.tested == 4
    assert [s["passes"] for s in chosen.scores] == [True, True, True, False]
    # without the margin the cheap one passes: the margin is applied, not ignored
    assert pool[select(pool, REFERENCE, SelectionRule("point_estimate", 0.3, 0.0)).index].knob == "cheap-but-bad"
    assert SelectionRule("point_estimate").mode == "point_estimate", "the old name is still read"


def test_fixed_sequence_stops_at_the_first_failure_when_passing_candidates_are_not_contiguous():
    # candidates 0, 1 pass, 2 fails, 3 (the cheapest) passes again: a valid choice never reaches 3
    rule = SelectionRule("certified", tolerance_pp=0.5, delta=0.1)
    pool = [candidate("full", 0, 0, 100), candidate("mid", 0, 1, 50), candidate("fails", 0, 9, 30),
            candidate("cheap-lucky", 0, 0, 10)]
    chosen = select(pool, REFERENCE, rule)
    assert [s["passes"] for s in chosen.scores] == [True, True, False, True]
    assert pool[chosen.index].knob == "mid" and chosen.tested == 3
    assert [s["tested"] for s in chosen.scores] == [True, True, True, False]
    assert pool[cheapest_passing_anywhere(pool, rule)].knob == "cheap-lucky", "the invalid rule would take it"


def test_the_cheapest_of_the_passed_prefix_wins_even_when_costs_are_not_monotone():
    rule = SelectionRule("certified", tolerance_pp=0.5, delta=0.1)
    pool = [candidate("a", 0, 0, 100), candidate("b-cheapest", 0, 0, 20), candidate("c", 0, 1, 40),
            candidate("d-fails", 0, 9, 5)]
    chosen = select(pool, REFERENCE, rule)
    assert pool[chosen.index].knob == "b-cheapest"
    tie = [candidate("first", 0, 0, 50), candidate("second", 0, 0, 50)]
    assert select(tie, REFERENCE, rule).index == 0, "ties go to the safer (earlier) candidate"


def test_certified_rule_bounds_disagreement_and_ignores_labels():
    rule = SelectionRule("certified", tolerance_pp=0.5, delta=0.1)
    # 1,000 inputs: 1 disagreement has a 90% upper bound of 0.39% (passes), 3 have 0.67% (fails)
    assert disagreement_upper_bound(1, 1000, 0.1) < 0.005 < disagreement_upper_bound(3, 1000, 0.1)
    pool = [
        candidate("one-disagrees", n_wrong=0, n_disagree=1, flops=20),
        candidate("wrong-but-agreeing", n_wrong=50, n_disagree=0, flops=15),  # labels say bad; agreement is perfect
        candidate("three-disagree", n_wrong=0, n_disagree=3, flops=10),
    ]
    chosen = select(pool, REFERENCE, rule)
    assert pool[chosen.index].knob == "wrong-but-agreeing"
    # the labeled rules read the labels instead, and stop at the wrong candidate
    assert pool[select(pool, REFERENCE, SelectionRule("point_estimate", 0.5, 0.1)).index].knob == "one-disagrees"
    assert pool[select(pool, REFERENCE, SelectionRule("certified_accuracy", 0.5)).index].knob == "one-disagrees"


def test_certified_accuracy_rule_bounds_the_inputs_lost_not_those_that_only_disagree():
    # the reference is wrong on the first 20 inputs; a candidate that disagrees only there loses nothing
    reference = np.ones(1000, bool)
    reference[:20] = False
    loses_nothing = Candidate("swaps-wrong-answers", reference.copy(), np.arange(1000) >= 20, 10)
    loses_three = reference.copy()
    loses_three[20:23] = False
    pool = [Candidate("full", reference.copy(), np.ones(1000, bool), 100), loses_nothing,
            Candidate("loses-three", loses_three, np.arange(1000) >= 23, 5)]
    rule = SelectionRule("certified_accuracy", tolerance_pp=0.5, delta=0.1)
    chosen = select(pool, reference, rule)
    assert pool[chosen.index].knob == "swaps-wrong-answers"
    assert chosen.scores[1]["drop_bound_pp"] == pytest.approx(100 * disagreement_upper_bound(0, 1000, 0.1))
    assert chosen.scores[2]["drop_bound_pp"] == pytest.approx(100 * disagreement_upper_bound(3, 1000, 0.1))
    # on disagreement the same candidate fails (20 of 1,000 differ), so the certified rule keeps the full one
    assert select(pool, reference, SelectionRule("certified", 0.5)).index == 0


def test_clopper_pearson_bound_is_exact():
    # the bound u solves P(Binomial(n, u) <= k) = delta
    for k, n in ((0, 50), (2, 500), (10, 6000)):
        u = disagreement_upper_bound(k, n, 0.1)
        assert binom.cdf(k, n, u) == pytest.approx(0.1, abs=1e-9)
        assert disagreement_upper_bound(k, n, 0.05) > u  # more confidence, a looser bound
    assert disagreement_upper_bound(5, 5, 0.1) == 1.0


def test_when_the_safest_candidate_fails_it_is_taken_and_nothing_is_certified():
    pool = [candidate("safest", 5, 5, 90), candidate("mid", 7, 7, 50), candidate("cheap", 0, 0, 10)]
    for rule in (SelectionRule("point_estimate", 0.1, 0.1), SelectionRule("certified", 0.1),
                 SelectionRule("certified_accuracy", 0.1)):
        chosen = select(pool, REFERENCE, rule)
        assert pool[chosen.index].knob == "safest" and not chosen.meets_target and chosen.tested == 1


def cheapest_passing_anywhere(pool: list[Candidate], rule: SelectionRule) -> int:
    """The rule this project used before fixed-sequence testing (kept here only to show it fails)."""
    scores = [score(c, REFERENCE[: len(c.agree)], rule) for c in pool]
    passing = [i for i, s in enumerate(scores) if s["passes"]]
    return min(passing, key=lambda i: scores[i]["cost"]) if passing else 0


def test_simulation_fixed_sequence_keeps_its_error_rate_and_cheapest_passing_anywhere_does_not():
    # 40 candidates, safest first: 8 whose true disagreement is within the tolerance, then 32 just past it
    # (each passes its own test now and then). A selection errs when its choice's true rate exceeds the tolerance.
    tolerance, delta, n, draws = 0.01, 0.1, 1000, 4000
    true_rates = np.concatenate([np.linspace(0.0, 0.004, 8), np.full(32, 0.0115)])
    rng = np.random.default_rng(0)
    counts = rng.binomial(n, true_rates, size=(draws, len(true_rates)))  # independent calibration sets
    bounds = np.vectorize(lambda k: disagreement_upper_bound(int(k), n, delta))(np.arange(n + 1))[counts]
    passes = bounds <= tolerance + 1e-12
    flops = np.linspace(100, 1, len(true_rates))  # safest = dearest
    bad = true_rates > tolerance
    fixed_errors = invalid_errors = 0
    rule = SelectionRule("certified", tolerance_pp=100 * tolerance, delta=delta)
    for d in range(draws):
        if d < 200:  # the project's select() on real candidates agrees with the vectorised rule below
            pool = [Candidate(i, np.ones(n, bool), np.arange(n) >= k, f) for i, (k, f) in
                    enumerate(zip(counts[d], flops, strict=True))]
            chosen = select(pool, REFERENCE[:n], rule)
            prefix = np.argmin(passes[d]) if not passes[d].all() else len(passes[d])
            assert chosen.index == (prefix - 1 if prefix else 0)
        prefix = np.argmin(passes[d]) if not passes[d].all() else len(passes[d])
        fixed_errors += bool(prefix and bad[prefix - 1])
        anywhere = np.flatnonzero(passes[d])
        invalid_errors += bool(len(anywhere) and bad[anywhere[np.argmin(flops[anywhere])]])
    fixed_rate, invalid_rate = fixed_errors / draws, invalid_errors / draws
    slack = 3 * np.sqrt(delta * (1 - delta) / draws)
    assert fixed_rate <= delta + slack, fixed_rate
    assert invalid_rate > delta + slack, invalid_rate
    # and the invalid rule really is the function above on the same candidates
    pool = [Candidate(i, np.ones(n, bool), np.arange(n) >= k, f) for i, (k, f) in enumerate(zip(counts[0], flops, strict=True))]
    expected = np.flatnonzero(passes[0])
    assert cheapest_passing_anywhere(pool, rule) == (expected[np.argmin(flops[expected])] if len(expected) else 0)


def test_operating_points_map_a_tolerance_to_the_cheapest_certified_price():
    # a curve, lowest price first: bounds 0.05%, 0.08%, 0.15% (fails 0.1%), 0.06% (cheap, but after a failure)
    points = [OperatingPoint(lam, mflops, 0.0, bound, 5000, 0.1) for lam, mflops, bound in
              ((0.001, 40.0, 0.0005), (0.01, 20.0, 0.0008), (0.1, 10.0, 0.0015), (1.0, 5.0, 0.0006))]
    assert certified_point(points, 0.1).lam == 0.01
    assert certified_point(points[::-1], 0.1).lam == 0.01, "the order is the price's, not the list's"
    assert certified_point(points, 0.2).lam == 1.0
    with pytest.raises(NothingCertifiedError, match="at least 0.05%"):
        certified_point(points, 0.04)
    assert images_to_certify(0.1, 0.1) == 2302 and disagreement_upper_bound(0, 2302, 0.1) <= 0.001
    assert disagreement_upper_bound(0, 2301, 0.1) > 0.001


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
                                                SelectionRule("point_estimate", 0.2, 0.1))
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
    tau, selection, outcome = choose_and_apply(family, table, table, SelectionRule("point_estimate", 0.1, 0.0))
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
    tau, _, outcome = choose_and_apply(family, table, table, SelectionRule("point_estimate", 0.1, 0.0))
    assert tau == 0.95
    assert outcome.flops.tolist() == [250] * 20 + [100] * 80
    assert (outcome.predicted == 0).all()


def test_cross_fitting_calibrates_on_one_half_and_measures_on_the_other():
    # the glance disagrees with the full configuration on half A only: calibrated on A it is refused for B, and
    # calibrated on B it is taken for A, where it loses; cross-fitting shows that loss instead of hiding it
    n = 2000
    table0 = synthetic_table(np.ones((n, 2, 1, 1), bool))
    first, second = split_halves(len(table0))
    assert len(np.intersect1d(first, second)) == 0 and len(first) + len(second) == n
    agree = np.ones((n, 2, 1, 1), bool)
    agree[first[:40], 0, 0, 0] = False
    table = synthetic_table(np.ones((n, 2, 1, 1), bool), agree=agree)
    run = SelectionRun(SelectionRule("certified", tolerance_pp=1.0), "test_halves")
    outcome, records = run_family(FixedFamily(table), run, table, table, split_halves(len(table)))
    assert [r["index"] for r in records] == [[1, 0, 0], [0, 0, 0]]  # calibrated on A: full; on B: the glance
    assert [r["evaluated_on"] for r in records] == [n // 2, n // 2]
    disagree = outcome.predicted != table.predicted[:, -1, -1, -1]
    assert disagree[first].sum() == 40 and disagree[second].sum() == 0
