import dataclasses

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv

from backbone.data import load_dataset
from envs import (
    ENV_ID,
    AdaptiveComputeEnv,
    FeatureSpec,
    LiveBackend,
    TableVecEnv,
    build_outcome_table,
    cached_outcome_table,
)


@pytest.fixture(scope="module")
def digits_subset():
    split = load_dataset("digits").splits["policy_train"]
    return split.x[:48], split.y[:48]


@pytest.fixture
def table(tiny_model, digits_subset):
    return build_outcome_table(tiny_model, *digits_subset, FeatureSpec(pooled=True))


def test_table_shapes_and_consistency(table, tiny_model, digits_subset):
    x, y = digits_subset
    assert table.features.shape == (48, tiny_model.config.embed_dim + 13)
    assert table.correct.shape == table.true_logprob.shape == table.confidence.shape == (48, 3, 3, 3)
    assert table.flops.shape == (3, 3, 3) and table.full_flops == table.flops.max()
    assert table.predicted.shape == (48, 3, 3, 3)
    assert np.array_equal(table.agree, table.predicted == table.predicted[:, 2:, 2:, 2:])
    # staged costs: the glance's own point costs the glance alone, every other point at least its fresh pass
    glance = (0, 0, 0)
    assert table.staged_flops[glance] == table.flops[glance]
    assert (np.delete(table.staged_flops.ravel(), 0) > np.delete(table.flops.ravel(), 0) * 0.9).all()
    with torch.no_grad():
        logits = tiny_model(x[:5], tokens=4, depth=2, width=0.5)
    assert np.array_equal(table.correct[:5, 1, 1, 1], (logits.argmax(-1) == y[:5]).numpy())
    assert np.array_equal(table.predicted[:5, 1, 1, 1], logits.argmax(-1).numpy())
    assert np.allclose(table.true_logprob[:5, 1, 1, 1], logits.log_softmax(-1)[torch.arange(5), y[:5]].numpy(), atol=1e-5)


def test_env_passes_gymnasium_and_sb3_checkers(table):
    gym_check_env(AdaptiveComputeEnv(table=table, lam=0.1), skip_render_check=True)
    sb3_check_env(AdaptiveComputeEnv(table=table, lam=0.1))


def test_env_is_registered(table):
    env = gymnasium.make(ENV_ID, table=table, lam=0.2)
    obs, info = env.reset(seed=0)
    assert obs.shape == (table.features.shape[1],)
    _, reward, terminated, truncated, info = env.step(np.array([2, 2, 2]))
    assert terminated and not truncated
    assert reward == pytest.approx(float(info["correct"]) - 0.2 * table.staged_flops[2, 2, 2] / table.full_flops)


def test_reward_is_accuracy_minus_priced_flops(table):
    env = AdaptiveComputeEnv(table=table, lam=0.5)
    env.reset(seed=0, options={"index": 7})
    _, reward, _, _, info = env.step(np.array([0, 1, 2]))
    expected = float(table.correct[7, 0, 1, 2]) - 0.5 * table.staged_flops[0, 1, 2] / table.full_flops
    assert reward == pytest.approx(expected)
    assert info["config"] == (2, 2, 1.0) and info["flops"] == table.staged_flops[0, 1, 2]
    agree_env = AdaptiveComputeEnv(table=table, lam=0.5, reward="agree")
    agree_env.reset(options={"index": 7})
    expected = float(table.agree[7, 0, 1, 2]) - 0.5 * table.staged_flops[0, 1, 2] / table.full_flops
    assert agree_env.step(np.array([0, 1, 2]))[1] == pytest.approx(expected)


def test_price_conditioned_envs_show_and_charge_the_episode_price(table):
    from envs import Price

    price = Price.between(0.01, 1.0)
    env = AdaptiveComputeEnv(table=table, lam=(0.01, 1.0))  # a pair is a conditioned price too
    obs, _ = env.reset(seed=0, options={"index": 4, "lam": 0.1})
    assert obs.shape == (table.features.shape[1] + 1,) and obs[-1] == pytest.approx(0.0)  # log-midpoint -> 0
    _, reward, *_ = env.step(np.array([1, 1, 1]))
    assert reward == pytest.approx(float(table.correct[4, 1, 1, 1]) - 0.1 * table.staged_flops[1, 1, 1] / table.full_flops)
    vec = TableVecEnv(table, num_envs=64, lam=price, seed=0)
    obs = vec.reset()
    assert obs.shape == (64, table.features.shape[1] + 1)
    assert np.allclose(obs[:, -1], price.column(vec.lam)) and 0.01 <= vec.lam.min() < vec.lam.max() <= 1.0
    lam, index = vec.lam.copy(), vec.index.copy()
    _, rewards, _, infos = vec.step(np.ones((64, 3), np.int64))
    cost = table.staged_flops[1, 1, 1] / table.full_flops
    assert np.allclose(rewards, table.correct[index, 1, 1, 1] - lam * cost, atol=1e-6)
    assert np.allclose(infos[0]["terminal_observation"][-1], price.column(lam[0]))


def test_live_and_table_modes_give_identical_rewards(table, tiny_model, digits_subset):
    table_env = AdaptiveComputeEnv(table=table, lam=0.3)
    live_env = AdaptiveComputeEnv(live=LiveBackend(tiny_model, *digits_subset, FeatureSpec(pooled=True)), lam=0.3)
    rng = np.random.default_rng(0)
    for index in range(0, 48, 5):
        action = rng.integers(0, 3, size=3)
        obs_t, _ = table_env.reset(options={"index": index})
        obs_l, _ = live_env.reset(options={"index": index})
        assert np.allclose(obs_t, obs_l, atol=1e-5)
        _, reward_t, *_ = table_env.step(action)
        _, reward_l, *_ = live_env.step(action)
        assert reward_t == pytest.approx(reward_l, abs=1e-6)
    logprob_table = AdaptiveComputeEnv(table=table, lam=0.3, reward="logprob")
    logprob_live = AdaptiveComputeEnv(live=LiveBackend(tiny_model, *digits_subset, FeatureSpec(pooled=True)), lam=0.3, reward="logprob")
    logprob_table.reset(options={"index": 3})
    logprob_live.reset(options={"index": 3})
    assert logprob_table.step([1, 0, 2])[1] == pytest.approx(logprob_live.step([1, 0, 2])[1], abs=1e-4)


def test_vec_env_matches_plain_env(table):
    vec = TableVecEnv(table, num_envs=16, lam=0.25, seed=3)
    vec.reset()
    actions = np.random.default_rng(1).integers(0, 3, size=(16, 3))
    index = vec.index.copy()
    _, rewards, dones, infos = vec.step(actions)
    plain = AdaptiveComputeEnv(table=table, lam=0.25)
    for i in range(16):
        plain.reset(options={"index": int(index[i])})
        _, reward, *_ = plain.step(actions[i])
        assert rewards[i] == pytest.approx(reward, abs=1e-6)
        assert np.array_equal(infos[i]["terminal_observation"], table.features[index[i]])
    assert dones.all()
    stats = vec.pop_stats()
    assert stats["reward"] == pytest.approx(rewards.mean(), abs=1e-6)
    assert vec.pop_stats() == {}
    # stepping the same inputs through SB3's DummyVecEnv over the plain env gives the same rewards
    dummy = DummyVecEnv([lambda: AdaptiveComputeEnv(table=table, lam=0.25)])
    dummy.reset()
    dummy.envs[0].reset(options={"index": int(index[0])})
    assert dummy.step(actions[:1])[1][0] == pytest.approx(rewards[0], abs=1e-6)


def test_cache_reused_and_invalidated(tmp_path, tiny_model, digits_subset, monkeypatch):
    x, y = digits_subset
    calls = []
    import envs.outcome_table as ot

    real_build = ot.build_outcome_table
    monkeypatch.setattr(ot, "build_outcome_table", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    spec = FeatureSpec()
    first = cached_outcome_table(tiny_model, "hashA", "policy_train", x, y, spec, tmp_path)
    again = cached_outcome_table(tiny_model, "hashA", "policy_train", x, y, spec, tmp_path)
    assert len(calls) == 1 and np.array_equal(first.correct, again.correct)
    cached_outcome_table(tiny_model, "hashB", "policy_train", x, y, spec, tmp_path)  # other backbone
    cached_outcome_table(tiny_model, "hashA", "policy_train", x[:40], y[:40], spec, tmp_path)  # other split contents
    cached_outcome_table(tiny_model, "hashA", "calibration", x, y, spec, tmp_path)  # other split name
    cached_outcome_table(tiny_model, "hashA", "policy_train", x, y, FeatureSpec(pooled=True), tmp_path)  # other features
    assert len(calls) == 5
    # a corrupt cache file is rebuilt, never trusted
    for path in tmp_path.glob("*.npz"):
        path.write_bytes(b"garbage")
    cached_outcome_table(tiny_model, "hashA", "policy_train", x, y, spec, tmp_path)
    assert len(calls) == 6


def _rewrite(path, **changes):
    """Replace arrays of a cached table in place, keeping its header (and so its recorded digest)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {key: f[key] for key in f.files}
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "empty", "labels", "nan_features", "short"])
def test_a_damaged_cache_is_rebuilt_with_a_notice(tmp_path, tiny_model, digits_subset, monkeypatch, capsys, damage):
    import envs.outcome_table as ot

    x, y = digits_subset
    spec = FeatureSpec()
    good = cached_outcome_table(tiny_model, "hashA", "calibration", x, y, spec, tmp_path)
    (path,) = tmp_path.glob("*.npz")
    with np.load(path, allow_pickle=False) as f:
        header = str(f["header"])
    if damage == "zeroed":  # what the report then called a 0.00% reference
        _rewrite(path, predicted=((good.predicted + 1) % 10).astype(good.predicted.dtype))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # arrays and a digest that agree, but not with the split or the features
        table = dataclasses.replace(good, labels=(good.labels + 1) % 10) if damage == "labels" else good
        if damage == "nan_features":
            table = dataclasses.replace(good, features=np.full_like(good.features, np.nan))
        if damage == "short":
            table = good.subset(np.arange(len(good) - 1))
        ot.save_table(table, path)
    calls = []
    real_build = ot.build_outcome_table
    monkeypatch.setattr(ot, "build_outcome_table", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    again = cached_outcome_table(tiny_model, "hashA", "calibration", x, y, spec, tmp_path)
    assert calls == [1], "the damaged table was used instead of rebuilt"
    assert "rebuilding the calibration outcome table" in capsys.readouterr().err
    assert np.array_equal(again.predicted, good.predicted) and np.array_equal(again.labels, good.labels)
    assert header  # the first table had a header to keep


def test_shards_merge_into_the_file_of_their_concatenation(tmp_path, table):
    """The torchrun merge: memory-mapped row slices written in small chunks give the file of the whole table."""
    import envs.outcome_table as ot

    ot.save_table(table, tmp_path / "whole.npz")
    for i, rows in enumerate(np.array_split(np.arange(len(table)), 3)):
        ot.save_table(table.subset(rows), tmp_path / f"shard{i}.npz")
    shards = [ot.load_table(tmp_path / f"shard{i}.npz", mmap=True) for i in range(3)]
    ot.save_concatenated(shards, tmp_path / "merged.npz", chunk_bytes=1000)  # many chunks per shard
    whole, merged = ot.load_table(tmp_path / "whole.npz"), ot.load_table(tmp_path / "merged.npz", mmap=True)
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "merged.npz") as b:
        assert str(a["header"]) == str(b["header"]), "same digest and metadata"
    for key in ot.ARRAYS:
        assert np.array_equal(getattr(whole, key), getattr(merged, key)), key
    # a shard from another grid cannot be merged in
    other = dataclasses.replace(table, predicted=table.predicted[:, :2])
    with pytest.raises(ot.TableError, match="predicted"):
        ot.save_concatenated([table, other], tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_env_rejects_bad_arguments(table):
    with pytest.raises(ValueError, match="exactly one"):
        AdaptiveComputeEnv()
    with pytest.raises(ValueError, match="lam must be"):
        AdaptiveComputeEnv(table=table, lam=-1)


@pytest.mark.slow
def test_live_mode_in_subprocesses_matches_the_table(table, tiny_model, digits_subset):
    from envs import make_live_vec_env

    vec = make_live_vec_env(LiveBackend(tiny_model, *digits_subset, FeatureSpec(pooled=True)), num_envs=2, lam=0.3,
                            subprocess=True)
    try:
        obs = vec.reset()
        index = [info["index"] for info in vec.reset_infos]
        assert np.allclose(obs, table.features[index], atol=1e-5)
        actions = np.array([[0, 1, 2], [2, 2, 0]])
        _, rewards, dones, infos = vec.step(actions)
        assert [info["index"] for info in infos] == index
        for i in range(2):
            k, l, m = actions[i]
            expected = float(table.correct[index[i], k, l, m]) - 0.3 * table.staged_flops[k, l, m] / table.full_flops
            assert rewards[i] == pytest.approx(expected, abs=1e-6)
        assert dones.all()
    finally:
        vec.close()


def test_build_tables_warms_the_cache_that_a_policy_with_that_glance_reads(tmp_path, monkeypatch):
    import envs.outcome_table as ot
    from experiments import build_tables
    from policy.job import PolicyJob, load_tables

    build_tables.main(["--splits", "calibration", "--glance", "4,2,0.5", "--cache-dir", str(tmp_path), "--quiet",
                       "--device", "cpu"])
    built = sorted(tmp_path.glob("*.npz"))
    calls = []
    real_build = ot.build_outcome_table
    monkeypatch.setattr(ot, "build_outcome_table", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    job = PolicyJob(cache_dir=str(tmp_path), features=FeatureSpec.from_flags(False, (4, 2, 0.5)), quiet=True)
    load_tables(job, ("calibration",))
    assert calls == [] and sorted(tmp_path.glob("*.npz")) == built  # read from the cache, not rebuilt
    load_tables(PolicyJob(cache_dir=str(tmp_path), quiet=True), ("calibration",))  # the default glance: another table
    assert calls == [1] and len(list(tmp_path.glob("*.npz"))) == len(built) + 1
