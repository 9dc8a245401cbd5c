"""Latency tables and latency-priced policies.

Timings are noisy, so these tests check structure (shapes, which work each figure times, where a table
goes and what it prices), never which configuration is faster.
"""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_backbone, synthetic_table

from backbone.errors import ProjectError
from backbone.io import write_json
from envs import AdaptiveComputeEnv, FeatureSpec, TableVecEnv
from evaluation.families import FixedFamily, PolicyFamily, choose_and_apply
from evaluation.latency import measure_latency_table
from experiments import evaluate, measure_latency, train_policy
from policy.artifact import PolicyArtifact, load_policy, make_policy, policy_outcome
from policy.latency_table import LatencyTableError, check_latency_table, latency_cost, load_latency_table
from policy.selection import Candidate, SelectionRule, select
from policy.train import PolicyTrainConfig, train_and_calibrate


def quick_table(model, spec=None, **kwargs) -> dict:
    images = torch.rand(5, 1, model.config.img_size, model.config.img_size)
    options = {"batch_size": 2, "rounds": 2, "repeats": 1, "warmup": 1, **kwargs}
    return measure_latency_table(model, spec or FeatureSpec(), images, **options)


# ---- measuring ---------------------------------------------------------------------------------------------------


def test_latency_table_times_every_point_staged_and_fresh(tiny_model, monkeypatch, tmp_path):
    real_extend, extends = tiny_model.extend, []

    def counting_extend(state, *point, **kwargs):
        extends.append(tuple(point))
        return real_extend(state, *point, **kwargs)

    monkeypatch.setattr(tiny_model, "extend", counting_extend)
    table = quick_table(tiny_model, backbone_hash="ab" * 32)
    for kind in ("staged", "fresh"):
        grid = np.array(table[f"{kind}_ms"])
        assert grid.shape == (3, 3, 3) and np.isfinite(grid).all() and (grid > 0).all(), kind
    assert table["full_ms"] == table["fresh_ms"][-1][-1][-1]
    assert table["glance"] == [2, 1, 0.25] and table["glance_ms"] == table["staged_ms"][0][0][0]
    # the glance's own point answers with the glance; every other point extends it, in every run (warm-up included)
    runs = 1 + 2 * 1
    assert len(extends) == runs * (27 - 1) and (2, 1, 0.25) not in extends
    assert table["batch_size"] == 2 and table["rounds"] == 2 and table["threads"] == torch.get_num_threads()
    assert table["device"] == "cpu" and table["cpu"] and table["torch"] == torch.__version__
    assert table["backbone_hash"] == "ab" * 32
    assert table["token_grans"] == [2, 4, 8] and table["depths"] == [1, 2, 3] and table["ffn_widths"] == [0.25, 0.5, 1.0]
    # JSON round trip: the table read back fits this backbone and prices actions by staged ms / full ms
    write_json(tmp_path / "latency.json", table)
    loaded = load_latency_table(tmp_path / "latency.json")
    check_latency_table(loaded, tiny_model.config, FeatureSpec())
    assert np.allclose(latency_cost(loaded), np.array(table["staged_ms"]) / table["full_ms"])


def test_without_a_glance_every_point_is_a_fresh_pass_after_the_features(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model, "extend", lambda *a, **k: pytest.fail("no glance to extend"))
    table = quick_table(tiny_model, FeatureSpec(pooled=True, glance=False), rounds=1)
    assert table["glance"] is None and table["glance_ms"] is None
    assert (np.array(table["staged_ms"]) > 0).all()


def test_bad_measuring_arguments_are_refused(tiny_model):
    with pytest.raises(ValueError, match="cannot fill a batch"):
        quick_table(tiny_model, batch_size=8)
    with pytest.raises(ValueError, match="rounds"):
        quick_table(tiny_model, rounds=0)


# ---- checking a table --------------------------------------------------------------------------------------------


def test_a_table_for_another_grid_architecture_or_glance_is_refused(tiny_model, tmp_path):
    table = quick_table(tiny_model, rounds=1, warmup=0)
    config = tiny_model.config
    with pytest.raises(LatencyTableError, match="token_grans") as refused:
        check_latency_table(table, dataclasses.replace(config, token_grans=(2, 4, 16)))
    assert isinstance(refused.value, ProjectError) and "measure_latency.py" in str(refused.value)
    with pytest.raises(LatencyTableError, match="depths"):
        check_latency_table(table, dataclasses.replace(config, depth=4))
    with pytest.raises(LatencyTableError, match="architecture"):
        check_latency_table(table, dataclasses.replace(config, embed_dim=32))
    with pytest.raises(LatencyTableError, match="glance"):
        check_latency_table(table, config, FeatureSpec(glance_depth=2))
    # malformed files: a grid that is not (K, L, M) of its own axes, a non-positive time, not JSON
    without_fresh = {key: value for key, value in table.items() if key != "fresh_ms"}
    for name, broken in [("shape", {**table, "staged_ms": table["staged_ms"][:2]}), ("> 0", {**table, "full_ms": 0}),
                         ("missing", without_fresh)]:
        write_json(tmp_path / "bad.json", broken)
        with pytest.raises(LatencyTableError, match=name):
            load_latency_table(tmp_path / "bad.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(LatencyTableError, match="unreadable"):
        load_latency_table(tmp_path / "garbage.json")
    with pytest.raises(LatencyTableError, match="not found"):
        load_latency_table(tmp_path / "none.json")


# ---- pricing by a cost grid --------------------------------------------------------------------------------------


def test_latency_cost_prices_env_steps_by_the_given_grid():
    rng = np.random.default_rng(0)
    correct = rng.random((20, 2, 3, 2)) < 0.6
    table = synthetic_table(correct)
    cost = np.arange(12, dtype=np.float64)[::-1].reshape(2, 3, 2) / 11  # dearest where FLOPs are fewest
    env = AdaptiveComputeEnv(table=table, lam=0.5, reward="correct", cost=cost)
    for index, action in [(3, (0, 0, 0)), (7, (1, 2, 1)), (11, (0, 2, 1))]:
        env.reset(options={"index": index})
        _, value, _, _, info = env.step(np.array(action))
        assert value == pytest.approx(float(correct[(index, *action)]) - 0.5 * cost[action])
        assert info["cost"] == cost[action] and info["flops"] == table.staged_flops[action]  # FLOPs still reported

    vec = TableVecEnv(table, num_envs=4, lam=0.5, reward="correct", cost=cost)
    vec.reset()
    index = vec.index.copy()
    actions = np.array([[0, 0, 0], [1, 2, 1], [0, 1, 1], [1, 0, 0]])
    _, rewards, _, infos = vec.step(actions)
    k, l, m = actions.T
    assert np.allclose(rewards, correct[index, k, l, m] - 0.5 * cost[k, l, m], atol=1e-6)
    assert [i["flops"] for i in infos] == table.staged_flops[k, l, m].tolist()
    # without a grid the price is staged FLOPs over the full configuration's, as before
    assert np.allclose(TableVecEnv(table, num_envs=4).cost, table.staged_flops / table.full_flops)
    with pytest.raises(ValueError, match="shape"):
        TableVecEnv(table, num_envs=4, cost=np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="finite"):
        AdaptiveComputeEnv(table=table, cost=-cost)


def test_selection_picks_the_cheapest_by_latency_not_flops():
    # every configuration is right on every input, so the rule keeps the cheapest; FLOPs 100, 200, 300
    table = synthetic_table(np.ones((50, 3, 1, 1), bool))
    ms = np.array([5.0, 1.0, 3.0]).reshape(3, 1, 1)  # the fewest FLOPs is the slowest on this machine
    rule = SelectionRule("empirical")
    by_flops, _, _ = choose_and_apply(FixedFamily(table), table, table, rule)
    by_ms, _, outcome = choose_and_apply(FixedFamily(table, ms), table, table, rule)
    assert by_flops == (0, 0, 0) and by_ms == (1, 0, 0)
    assert outcome.flops[0] == 200 and outcome.cost[0] == 1.0 and outcome.actions.tolist()[0] == [1, 0, 0]
    # the rule ranks by a candidate's cost, which defaults to its FLOPs
    ok = np.ones(50, bool)
    pool = [Candidate("few-flops-slow", ok, ok, 100, cost=5.0), Candidate("more-flops-fast", ok, ok, 200, cost=1.0)]
    assert pool[select(pool, ok, rule).index].knob == "more-flops-fast"
    flops_only = [Candidate(c.knob, c.correct, c.agree, c.flops) for c in pool]
    assert flops_only[0].cost == 100 and pool[select(flops_only, ok, rule).index].knob == "few-flops-slow"


def test_a_latency_policy_is_priced_by_its_grid_and_a_flop_policy_by_flops():
    table = synthetic_table(np.ones((6, 2, 2, 2), bool))
    table.features[:] = np.random.default_rng(0).normal(size=table.features.shape)
    ms = np.random.default_rng(1).uniform(1, 5, size=(2, 2, 2))
    torch.manual_seed(0)
    policy = make_policy(2, [2, 2, 2], [8])
    scaler = (np.zeros(2, np.float32), np.ones(2, np.float32))
    latency_policy = PolicyArtifact(policy, *scaler, {"lam": 0.1, "cost": "latency"})
    out = policy_outcome(latency_policy, table, network_flops=7, cost=ms)
    index = tuple(out.actions.T)
    assert np.array_equal(out.cost, ms[index]) and np.array_equal(out.flops, table.staged_flops[index] + 7)
    family = PolicyFamily([latency_policy], cost=ms)
    assert np.array_equal(family.outcome(table, (0, 0.1)).cost, ms[index])
    assert family.describe((0, 0.1))["cost"] == "latency"
    flop_policy = PolicyArtifact(policy, *scaler, {"lam": 0.1})  # a policy from before: FLOPs
    outcome = PolicyFamily([flop_policy], cost=ms).outcome(table, (0, 0.1))
    assert np.array_equal(outcome.cost, outcome.flops)


def test_training_on_latency_needs_its_grid():
    table = synthetic_table(np.ones((4, 2, 2, 2), bool))
    with pytest.raises(ValueError, match="needs a cost grid"):
        train_and_calibrate(table, table, PolicyTrainConfig(cost="latency"), {})
    with pytest.raises(ValueError, match="no cost grid"):
        train_and_calibrate(table, table, PolicyTrainConfig(), {}, cost=np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="cost must be one of"):
        PolicyTrainConfig(cost="watts")


# ---- the scripts, end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    """measure_latency.py, then train_policy.py --cost latency, on digits with a tiny backbone."""
    root = tmp_path_factory.mktemp("latency_run")
    save_tiny_backbone(root / "backbone")
    table = measure_latency.main(["--backbone", str(root / "backbone"), "--rounds", "2", "--repeats", "1",
                                  "--warmup", "1", "--out", str(root / "latency.json"), "--quiet"])
    argv = ["--backbone", str(root / "backbone"), "--out", str(root / "policy"), "--cost", "latency",
            "--latency", str(root / "latency.json"), "--timesteps", "2048", "--lam-range", "0.01,1", "--quiet",
            "--cache-dir", str(root / "cache"), "--log-dir", str(root / "tb")]
    summary = train_policy.main(argv)
    return root, table, summary


def test_train_policy_with_cost_latency_end_to_end(latency_run):
    root, table, summary = latency_run
    assert table["dataset"] == "digits" and table["backbone"] == str(root / "backbone")
    policy_dir = root / "policy"
    copied = policy_dir / "latency.json"
    assert json.loads(copied.read_text()) == json.loads((root / "latency.json").read_text())
    meta = json.loads((policy_dir / "policy.json").read_text())
    assert meta["cost"] == "latency" and meta["train_config"]["cost"] == "latency"
    assert meta["latency"]["sha256"] == hashlib.sha256(copied.read_bytes()).hexdigest()
    assert load_policy(policy_dir).meta["cost"] == "latency"
    # the price is the cheapest passing one by latency (staged ms / full ms), and FLOPs are still reported
    records = meta["calibration"]
    assert all(0 < r["cost"] and r["cost_reduction"] == pytest.approx(1 - r["cost"]) and "flops" in r for r in records)
    passing = [r for r in records if r["passes"]]
    if passing:
        assert min(r["cost"] for r in passing) == pytest.approx(next(r for r in records if r["lambda"] == meta["lam"])["cost"])
    assert summary["cost"] == "latency" and 0 <= summary["flop_reduction"] <= 1
    assert summary["reference_ms_per_image"] == table["full_ms"] and summary["policy_ms_per_image"] > 0
    assert summary["fixed_baseline"]["ms_per_image"] > 0
    assert "latency price lambda" in train_policy.format_summary(summary)


def test_the_report_has_ms_per_image_for_every_family(latency_run):
    root, table, _ = latency_run
    argv = ["--backbone", str(root / "backbone"), "--policy", str(root / "policy"), "--cache-dir", str(root / "cache"),
            "--no-throughput", "--quiet"]
    report = evaluate.main(argv)  # finds the latency.json beside the policy
    assert report["latency"]["source"].endswith("latency.json") and report["latency"]["full_ms"] == table["full_ms"]
    assert report["reference"]["ms_per_image"] == table["full_ms"] and report["oracle"]["ms_per_image"] > 0
    for run in report["selections"]:
        for name, row in run["families"].items():
            assert row["ms_per_image"] > 0 and row["ms_note"] and "gflops" in row, (run["name"], name)
    assert "readouts" in report["early_exit"]["ms_note"] and "staged_ms" in report["ppo"]["ms_note"]
    fixed = report["fixed"]["selection"]["folds"][0]["config"]
    k, l, m = table["token_grans"].index(fixed[0]), fixed[1] - 1, table["ffn_widths"].index(fixed[2])
    assert report["fixed"]["ms_per_image"] == pytest.approx(table["fresh_ms"][k][l][m])
    # the report ranks the latency policy's prices by latency, as its training did: the same rule on the same
    # calibration split picks the same price
    point_estimate = next(run for run in report["selections"] if run["mode"] == "point_estimate")
    chosen = point_estimate["families"]["ppo"]["selection"]["folds"][0]
    assert chosen["cost"] == "latency" and chosen["lam"] == load_policy(root / "policy").meta["lam"]


def test_cost_latency_without_a_table_or_with_another_grid_stops_before_any_table(latency_run, tmp_path, monkeypatch):
    from policy import job as pipeline

    root, table, _ = latency_run
    monkeypatch.setattr(pipeline, "job_dataset", lambda *a, **k: pytest.fail("dataset read"))
    monkeypatch.setattr(pipeline, "load_tables", lambda *a, **k: pytest.fail("tables built"))
    with pytest.raises(SystemExit) as exit_info:
        train_policy.main(["--out", str(tmp_path / "p"), "--cost", "latency"])
    assert exit_info.value.code == 2
    write_json(tmp_path / "other.json", {**table, "token_grans": [2, 4, 16]})
    argv = ["--backbone", str(root / "backbone"), "--out", str(tmp_path / "p"), "--cost", "latency",
            "--latency", str(tmp_path / "other.json")]
    with pytest.raises(LatencyTableError, match=r"token_grans \[2, 4, 16\], but the backbone's are \[2, 4, 8\]"):
        train_policy.main(argv)
    with pytest.raises(LatencyTableError, match="token_grans"):
        evaluate.main(["--backbone", str(root / "backbone"), "--policy", str(root / "policy"),
                       "--latency", str(tmp_path / "other.json"), "--no-throughput", "--quiet"])


def test_a_swapped_latency_table_beside_the_policy_is_refused(latency_run, tmp_path):
    import shutil

    from policy.latency_table import LatencyTableError

    root, table, _ = latency_run
    policy = tmp_path / "policy"
    shutil.copytree(root / "policy", policy)
    write_json(policy / "latency.json", {**table, "full_ms": 100 * table["full_ms"]})  # valid, but not the policy's
    argv = ["--backbone", str(root / "backbone"), "--policy", str(policy), "--cache-dir", str(root / "cache"),
            "--no-throughput", "--quiet"]
    with pytest.raises(LatencyTableError, match="not the latency table this policy was saved with"):
        evaluate.main(argv)
