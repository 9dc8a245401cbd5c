import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import synthetic_table

from evaluation.baselines import early_exit, matched_random_actions, oracle_actions, pareto_front
from evaluation.uncertainty import front_ratio_interval, paired_stats
from experiments import evaluate

KEYS = ("accuracy", "delta_pp", "delta_pp_ci", "p_below_tolerance", "mcnemar_p", "gflops", "flop_reduction",
        "oracle_capture", "front_ratio", "front_ratio_bootstrap", "disagreement", "selection")
FAMILIES = ("fixed", "early_exit", "random", "glance_threshold", "router", "ppo")


def test_oracle_picks_cheapest_correct_or_full():
    correct = np.zeros((3, 2, 2, 1), bool)
    correct[0, 1, 1, 0] = True  # only the full one
    correct[1, 0, 1, 0] = correct[1, 1, 0, 0] = True  # flops 200 both: first in flat order
    table = synthetic_table(correct)  # row 2: nothing correct -> full
    assert oracle_actions(table).tolist() == [[1, 1, 0], [0, 1, 0], [1, 1, 0]]


def test_early_exit_charges_readouts():
    correct = np.ones((2, 1, 3, 1), bool)
    confidence = np.array([[0.2, 0.9, 0.95], [0.1, 0.2, 0.3]], np.float32)[:, None, :, None]
    table = synthetic_table(correct, confidence)
    result = early_exit(table, tau=0.8, width_index=0, readout_flops=7)
    # input 0 exits at depth 2 (one readout before), input 1 runs all 3 depths (two readouts before)
    assert result["flops_per_input"].tolist() == [200 + 7, 300 + 14]


def test_paired_stats_against_hand_computation():
    reference = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], bool)
    other = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1, 1], bool)  # lost 2, gained 1
    stats = paired_stats(other, reference)
    assert stats["delta_pp"] == pytest.approx(-10.0)
    assert stats["mcnemar_p"] == pytest.approx(1.0)  # exact two-sided binomial of 1 in 3
    low, high = stats["delta_pp_ci"]
    assert low <= -10.0 <= high
    same = paired_stats(reference, reference)
    assert same["delta_pp"] == 0 and same["mcnemar_p"] == 1.0 and same["p_below_tolerance"] == 0.0


def test_probability_below_the_tolerance_follows_the_evidence():
    reference = np.ones(4000, bool)
    worse, better, even = reference.copy(), reference.copy(), reference.copy()
    worse[:40] = False  # -1.0 pp: surely below -0.1 pp
    better[:40] = False
    reference_b = reference.copy()
    reference_b[40:120] = False  # the candidate gains 80 and loses 40: +1.0 pp
    even[:4] = False  # -0.1 pp exactly: about half the resamples are below
    assert paired_stats(worse, reference)["p_below_tolerance"] > 0.99
    assert paired_stats(better, reference_b)["p_below_tolerance"] < 0.01
    assert 0.3 < paired_stats(even, reference, tolerance_pp=0.1)["p_below_tolerance"] < 0.7
    assert paired_stats(worse, reference, tolerance_pp=2.0)["p_below_tolerance"] < 0.01, "the tolerance is read"


def test_front_ratio_interval_redraws_the_front():
    # two fixed configurations: A (flops 10) right on 90% of inputs, B (flops 100) right on all; a family as
    # accurate as B at flops 50 has ratio 0.5 on every resample; one as accurate as A at flops 5 has 0.5 too
    n = 2000
    grid_correct = np.ones((n, 2), bool)
    grid_correct[: n // 10, 0] = False
    grid_flops = np.array([10.0, 100.0])
    out = front_ratio_interval(np.ones(n, bool), np.full(n, 50.0), grid_correct, grid_flops)
    assert out["median"] == pytest.approx(0.5) and out["ci"] == pytest.approx([0.5, 0.5])
    # a family exactly as accurate as A on the same inputs: ratio 5/10 on every resample, never against B
    out = front_ratio_interval(grid_correct[:, 0], np.full(n, 5.0), grid_correct, grid_flops)
    assert out["ci"] == pytest.approx([0.5, 0.5])
    # one input short of A's accuracy, wrong on other inputs: some resamples put it level with A, others below
    family = np.ones(n, bool)
    family[n - n // 10 - 1 :] = False
    out = front_ratio_interval(family, np.full(n, 5.0), grid_correct, grid_flops)
    assert out["ci"] == pytest.approx([0.05, 0.5]), "against B (100) on some resamples, A (10) on others"


def test_random_baseline_hits_its_target():
    table = synthetic_table(np.ones((500, 4, 3, 2), bool))
    for target in (250.0, 700.0, 1500.0):
        actions = matched_random_actions(table, target, seed=0)
        realized = table.flops[tuple(actions.T)].mean()
        assert abs(realized - target) / target <= 0.02
        assert len({tuple(a) for a in actions}) > 3, "random means several configurations"


def test_pareto_front():
    points = [{"flops": 1, "accuracy": 0.5}, {"flops": 2, "accuracy": 0.4}, {"flops": 3, "accuracy": 0.7}]
    assert pareto_front(points) == [points[0], points[2]]


@pytest.fixture(scope="module")
def digits_report(tiny_run, tmp_path_factory):
    root, _ = tiny_run
    out = tmp_path_factory.mktemp("report")
    argv = ["--backbone", str(root / "backbone"), "--policy", str(root / "policy"), "--cache-dir", str(root / "cache"),
            "--seed-policies", str(root / "policy"), str(root / "policy"),
            "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--plot", str(out / "r.png")]
    report = evaluate.main(argv)
    return out, report


def test_report_json_has_every_family_and_key(digits_report):
    out, _ = digits_report
    report = json.loads((out / "r.json").read_text())
    for run in report["selections"]:
        assert set(run["families"]) == set(FAMILIES)
        for name, family in run["families"].items():
            for key in KEYS:
                assert key in family, (run["name"], name, key)
            assert family["selection"]["mode"] == run["mode"] and family["selection"]["tolerance_pp"] == 0.1
            folds = family["selection"]["folds"]
            assert sum(f["evaluated_on"] for f in folds) == report["n_test"]
    modes = [(run["mode"], run["calibrated_on"]) for run in report["selections"]]
    assert modes == [("certified", "test_halves"), ("certified_accuracy", "calibration"),
                     ("point_estimate", "calibration")]
    assert report["selections"][0]["families"]["ppo"]["selection"]["delta"] == 0.1
    assert all(f["selection"]["procedure"] == "fixed_sequence" for f in report["selections"][0]["families"].values())
    for run in report["selections"]:  # trained families over seeds: three of each, the first the shipped one
        for name in ("ppo", "router"):
            seeds = run["families"][name]["over_seeds"]
            assert seeds["n_seeds"] == 3 and len(seeds["per_seed"]) == 3
            assert seeds["per_seed"][0]["flop_reduction"] == run["families"][name]["flop_reduction"]
            values = [s["flop_reduction"] for s in seeds["per_seed"]]
            assert seeds["flop_reduction"]["mean"] == pytest.approx(np.mean(values))
    assert report["halves"]["drawn"] == "without labels"
    for name in FAMILIES:  # the first run's families at the top level
        assert report[name] == report["selections"][0]["families"][name]
    for name in ("reference", "fixed", "early_exit", "ppo"):
        assert report[name]["images_per_s"] > 0, name
    assert report["hindsight_fixed_front"]["front"] and "optimistic" in report["hindsight_fixed_front"]["note"]
    assert all(isinstance(c, list) and c for c in report["early_exit_curves"].values())
    markdown = (out / "r.md").read_text()
    assert "| oracle |" in markdown and "certified rule" in markdown and "point-estimate rule" in markdown
    assert "kept" not in markdown.lower(), "a point estimate is not called kept"


def test_no_fixed_configuration_beats_the_hindsight_front(digits_report):
    _, report = digits_report
    front = report["hindsight_fixed_front"]["front"]
    for point in report["hindsight_fixed_front"]["points"]:
        on_front = [p for p in front if p["flops"] <= point["flops"]]
        assert max(p["accuracy"] for p in on_front) >= point["accuracy"]
    # a fixed configuration, whichever rule chose it, is never below the front it belongs to
    for run in report["selections"]:
        assert run["families"]["fixed"]["front_ratio"] >= 1 - 1e-9


def test_oracle_is_never_beaten(digits_report):
    _, report = digits_report
    oracle = report["oracle"]
    points = [(p["accuracy"], p["gflops"]) for p in report["hindsight_fixed_front"]["points"]]
    points += [(p["accuracy"], p["gflops"]) for curve in report["early_exit_curves"].values() for p in curve]
    points += [(report["reference"]["accuracy"], report["reference"]["gflops"])]
    for accuracy, gflops in points:
        assert accuracy <= oracle["accuracy"] + 1e-12
        if gflops <= oracle["gflops"]:
            assert accuracy <= oracle["accuracy"]


def test_plot_is_a_valid_png(digits_report):
    out, _ = digits_report
    data = (out / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(out / "r.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_the_router_trains_on_a_tiny_policy_train_split():
    # a small image folder leaves a policy-train split of a few rows: too few for early stopping's held-out tenth
    from evaluation.families import RouterFamily

    rng = np.random.default_rng(0)
    table = synthetic_table(rng.random((8, 4, 3, 2)) < 0.7)
    table.features = rng.normal(size=(8, 2)).astype(np.float32)
    router = RouterFamily(table)
    assert router.network_flops > 0 and len(router.order) == 4 * 3 * 2 - 1
