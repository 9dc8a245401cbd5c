"""The paper-sized preset and the scale benchmark's library (evaluation/scale.py) on tiny configurations."""

import dataclasses
import mmap
import time

import numpy as np
import pytest
import torch

from backbone import AdaPerceiver, cascade_flops, flops, measure_flops
from backbone.config import ConfigError, paper_config, preset
from backbone.grid import GridPoint
from envs import FeatureSpec, TableVecEnv, load_table
from evaluation.scale import (
    AnonPeak,
    Mix,
    config_speed,
    map_point,
    merge_memory,
    mix_speed,
    ppo_speed,
    random_classifier,
    select_configs,
    synthetic_table,
    table_bytes_per_row,
    tabulation_speed,
    two_clocks,
)
from policy.train import PolicyTrainConfig


@pytest.fixture
def rgb_config(tiny_config):
    return dataclasses.replace(tiny_config, in_chans=3)


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return AdaPerceiver(paper_config()).eval()


@pytest.mark.parametrize("config", [(32, 1, 0.5), (96, 7, 0.75), (256, 21, 1.0)])
def test_paper_preset_flops_agree_with_torch_flop_counter(paper_model, config):
    x = torch.rand(1, 3, 224, 224)
    counted = measure_flops(lambda: paper_model(x, *config))  # attention included (measure_flops registers it)
    assert counted > 0
    assert abs(flops(paper_model.config, *config) - counted) / counted <= 0.02


def test_paper_preset_is_selected_by_name_and_checks_the_images():
    config = preset("imagenet", (3, 224, 224), 1000, "paper-in1k")
    assert config == paper_config()
    assert config.grid_shape == (6, 21, 3) and config.num_patches == 196 and config.embed_dim == 832
    assert 70e9 < flops(config) < 80e9
    with pytest.raises(ConfigError, match="3x224x224"):
        preset("fashion-mnist", (1, 28, 28), 10, "paper-in1k")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("digits", (1, 8, 8), 10, "paper-xl")
    assert preset("digits", (1, 8, 8), 10) == preset("digits", (1, 8, 8), 10, "auto")


def test_map_point_keeps_the_ends_and_relative_positions():
    fashion, paper = preset("fashion-mnist", (1, 28, 28), 10), paper_config()
    assert map_point(GridPoint(4, 1, 0.25), fashion, paper) == (32, 1, 0.5)  # the glance stays the glance
    assert map_point(GridPoint(32, 8, 1.0), fashion, paper) == (256, 21, 1.0)  # full stays full
    # token index 1 of 4 -> round(5/3) = 2 of 6; depth index 1 of 8 -> round(20/7) = 3 of 21; width index 1 -> 1
    assert map_point(GridPoint(8, 2, 0.5), fashion, paper) == (96, 4, 0.75)


def test_mix_assigns_its_shares(tiny_config):
    a, b, c = GridPoint(2, 1, 0.25), GridPoint(4, 2, 0.5), GridPoint(8, 3, 1.0)
    mix = Mix.of("m", [a] * 7 + [b] * 2 + [c], "test")
    assert mix.shares == {a: 0.7, b: 0.2, c: 0.1}
    assigned = mix.assign(20, seed=1)
    assert (assigned.count(a), assigned.count(b), assigned.count(c)) == (14, 4, 2)
    assert assigned != sorted(assigned) and assigned == mix.assign(20, seed=1)  # shuffled, seeded
    assert sorted(Mix.of("m", [a, a, b], "t").assign(4)).count(a) == 3  # largest remainder: 2.67 -> 3
    merged = mix.mapped(tiny_config, paper_config())
    # token index 1 of 3 -> round(2.5) = 2 of 6 (half to even); depth index 1 of 3 -> 10 of 21
    assert merged.shares == {GridPoint(32, 1, 0.5): 0.7, GridPoint(96, 11, 0.75): 0.2, GridPoint(256, 21, 1.0): 0.1}


def test_select_configs(tiny_config):
    assert len(select_configs(tiny_config, "all")) == 27
    corners = select_configs(tiny_config, "corners")
    assert corners[0] == (2, 1, 0.25) and corners[-1] == (8, 3, 1.0) and len(corners) == 5
    assert select_configs(tiny_config, "used", [GridPoint(4, 2, 0.5)]) == [(4, 2, 0.5), (8, 3, 1.0)]
    assert select_configs(tiny_config, "8/3/1,2/1/0.25") == [(2, 1, 0.25), (8, 3, 1.0)]
    with pytest.raises(ConfigError):
        select_configs(tiny_config, "3/1/0.25")
    with pytest.raises(ConfigError, match="tokens/depth/width"):
        select_configs(tiny_config, "everything")


class ScriptedTimer:
    """A timer with known answers: runs ``fn`` on every batch (so the code under test runs) and returns the next of
    ``values`` as the wall clock's images/s (and ten times it as the CPU time's), counting the calls."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, fn, batches):
        for batch in batches:
            fn(batch)
        self.calls += 1
        value = self.values.pop(0)
        return {"wall": value, "cpu": 10 * value}


def test_mix_speed_reports_ratios_of_the_timed_speeds(rgb_config):
    classifier = random_classifier(rgb_config)
    c = classifier.backbone.config
    glance, mid, full = GridPoint(2, 1, 0.25), GridPoint(4, 2, 0.5), GridPoint(8, 3, 1.0)
    mixes = [Mix("cheap", {glance: 0.5, mid: 0.25, full: 0.25}, "t"), Mix("all full", {full: 1.0}, "t")]
    images = torch.rand(8, 3, 8, 8)
    # rounds x (full, cheap, all full): medians 20, 50 and 18
    timer = ScriptedTimer([20, 50, 18, 10, 90, 19, 30, 40, 17])
    result = mix_speed(classifier, images, mixes, batch_size=4, rounds=3, timer=timer, seed=3)
    assert timer.calls == 9 and result["images"] == 8 and result["batch_size"] == 4
    wall, cpu = result["clocks"]["wall"], result["clocks"]["cpu"]
    assert wall["full_images_per_s"] == 20 and cpu["full_images_per_s"] == 200
    # FLOPs as paid, computed here from the staged grid (glance + extension) and the policy network
    staged = cascade_flops(c, glance).numpy()
    actions = [p.action(c.token_grans, c.ffn_widths) for p in mixes[0].assign(8, seed=3)]
    paid = np.mean([staged[a] for a in actions]) + classifier.network_flops
    speedup = flops(c) / paid
    assert result["mix_flops"]["cheap"]["gflops"] == pytest.approx(paid / 1e9)
    assert result["mix_flops"]["cheap"]["flop_speedup"] == pytest.approx(speedup)
    assert result["mix_flops"]["cheap"]["glance_share"] == 0.5
    cheap = wall["mixes"]["cheap"]
    assert cheap["images_per_s"] == 50 and cheap["realized_speedup"] == pytest.approx(50 / 20)
    assert cheap["efficiency"] == pytest.approx((50 / 20) / speedup)
    assert cpu["mixes"]["cheap"]["efficiency"] == pytest.approx((500 / 200) / speedup)
    # each round's mix over the full model timed just before it
    assert cheap["efficiency_by_round"] == pytest.approx([50 / 20 / speedup, 90 / 10 / speedup, 40 / 30 / speedup])
    everything = wall["mixes"]["all full"]
    assert everything["realized_speedup"] == pytest.approx(18 / 20) and result["mix_flops"]["all full"]["flop_speedup"] < 1


def test_assigned_configurations_answer_as_fresh_passes(rgb_config):
    classifier = random_classifier(rgb_config)
    images = torch.rand(6, 3, 8, 8)
    configs = [GridPoint(2, 1, 0.25), GridPoint(8, 3, 1.0), GridPoint(4, 2, 0.5), GridPoint(2, 1, 0.25),
               GridPoint(8, 2, 0.25), GridPoint(4, 2, 0.5)]
    prediction = classifier.predict_assigned(images, configs)
    assert prediction.configs == configs
    with torch.inference_mode():
        for i, config in enumerate(configs):
            fresh = classifier.backbone(images[i : i + 1], *config)
            assert (prediction.logits[i] - fresh[0]).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="5 configurations for 6 images"):
        classifier.predict_assigned(images, configs[:5])


def test_config_speed_reports_the_timed_speed(rgb_config):
    classifier = random_classifier(rgb_config)
    rows = config_speed(classifier, torch.rand(8, 3, 8, 8), [(8, 3, 1.0), (2, 1, 0.25)], 4, rounds=3,
                        timer=ScriptedTimer([100, 400, 300, 200, 200, 800]))
    assert [r["config"] for r in rows] == [[8, 3, 1.0], [2, 1, 0.25]]  # in the order given
    large, small = rows
    assert large["images_per_s"] == 200 and small["images_per_s"] == 400  # medians of 100/300/200, 400/200/800
    assert large["ms_per_batch"] == pytest.approx(1e3 * 4 / 200)
    assert large["gflop_per_s"] == pytest.approx(200 * flops(rgb_config, 8, 3, 1.0) / 1e9)
    assert large["cpu_images_per_s"] == 2000 and large["cpu_ms_per_batch"] == pytest.approx(1e3 * 4 / 2000)


def test_two_clocks_times_one_pass(rgb_config):
    calls = []
    speeds = two_clocks(lambda x: calls.append(len(x)) or sum(range(20_000)), [torch.zeros(3, 1)] * 4, warmup=2)
    assert calls == [3] * 6 and set(speeds) == {"wall", "cpu"} and speeds["wall"] > 0 and speeds["cpu"] > 0


def test_tabulation_speed_times_the_table_build(tiny_model):
    ticks = iter([10.0, 14.0])
    result = tabulation_speed(tiny_model, torch.rand(6, 1, 8, 8), batch_size=4, clock=lambda: next(ticks))
    assert result["images_per_s"] == pytest.approx(6 / 4.0) and result["configurations"] == 27
    spec, grid = FeatureSpec(), 27
    assert result["bytes_per_row"] == spec.dim(tiny_model.config) * 4 + grid * (2 + 4 + 4) + 8


def test_memory_mapped_table_gives_the_in_memory_rewards(tmp_path, tiny_config):
    path = synthetic_table(tmp_path / "table.npz", tiny_config, rows=300, chunk=128, seed=1)
    assert not [p for p in tmp_path.iterdir() if p != path]  # the scratch arrays are gone
    mapped, loaded = load_table(path, mmap=True), load_table(path)
    assert isinstance(mapped.features, np.memmap) and isinstance(mapped.predicted, np.memmap)
    assert not isinstance(loaded.features, np.memmap)
    assert len(mapped) == 300 and table_bytes_per_row(mapped) == table_bytes_per_row(loaded)
    assert 0 < mapped.correct.mean() < 1 and mapped.correct[:, -1, -1, -1].mean() > mapped.correct[:, 0, 0, 0].mean()
    rewards = []
    for table in (mapped, loaded):
        env = TableVecEnv(table, num_envs=32, lam=(0.01, 1.0), seed=5, reward="agree")
        env.reset()
        actions = np.random.default_rng(0).integers(0, 3, size=(32, 3))
        out = [env.step(actions)[1] for _ in range(4)]
        rewards.append(np.concatenate(out))
    assert np.array_equal(*rewards) and np.unique(rewards[0]).size > 1


def test_ppo_speed_on_a_memory_mapped_table(tmp_path, tiny_config):
    path = synthetic_table(tmp_path / "table.npz", tiny_config, rows=500)
    config = PolicyTrainConfig(num_envs=16, n_steps=4, batch_size=32, n_epochs=1, net_arch=[16], quiet=True)
    result = ppo_speed(path, timesteps=128, config=config)
    assert result["rows"] == 500 and result["timesteps"] == 128 and result["steps_per_s"] > 0
    assert result["table_bytes"] == path.stat().st_size and result["peak_rss_mib"] > 0


def test_anon_peak_sees_an_allocation_and_not_a_memory_map(tmp_path):
    with AnonPeak() as allocated:
        # 64 MiB of fresh anonymous pages (a heap allocation could reuse pages earlier tests freed), freed in the block
        block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block.write(b"x" * len(block))
        time.sleep(0.1)  # held across several samples
        block.close()
    assert allocated.growth > 48
    np.ones(64 * 2**20, dtype=np.uint8).tofile(tmp_path / "pages.bin")
    with AnonPeak() as mapped:
        assert int(np.memmap(tmp_path / "pages.bin", mode="r").sum()) == 64 * 2**20  # every file page read
    assert mapped.growth < 16


def test_merge_memory_merges_the_shards_of_the_rows(tmp_path, tiny_config):
    ticks = iter([2.0, 5.0])
    result = merge_memory(tiny_config, rows=301, shards=3, scratch=tmp_path, clock=lambda: next(ticks))
    single = synthetic_table(tmp_path / "single.npz", tiny_config, rows=301)
    assert result["rows"] == 301 and result["shards"] == 3 and result["seconds"] == 3.0
    # the merged file holds the rows of one 301-row table (same layout; sizes agree up to the zip's small records)
    assert abs(result["table_bytes"] - single.stat().st_size) < 1024
    assert list(tmp_path.iterdir()) == [single], "the shards and the merged file are removed"
