"""The FLOP price as one value: its grid, its observation column, its draws, its checks, its JSON round trip."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from backbone.errors import ProjectError
from envs import Price, PriceError
from envs.price import GRID
from policy.train import PolicyTrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_a_conditioned_price_grid_column_and_draw():
    price = Price.between(0.001, 1.0)
    assert price.conditioned and price.bounds == (0.001, 1.0) and price.columns == 1 and price.lam is None
    grid = price.grid()
    assert len(grid) == GRID and grid[0] == pytest.approx(0.001) and grid[-1] == pytest.approx(1.0)
    assert np.all(np.diff(grid) > 0) and np.allclose(np.diff(np.log(grid)), np.log(1000) / (GRID - 1))
    assert len(price.grid(5)) == 5
    # the column maps log lam from [log low, log high] onto [-1, 1]
    column = price.column(np.array([0.001, math.sqrt(0.001), 1.0]))
    assert column.dtype == np.float32 and np.allclose(column, [-1, 0, 1], atol=1e-6)
    assert float(price.column(0.001)) == pytest.approx(-1)
    drawn = price.draw(np.random.default_rng(0), size=1000)
    assert drawn.shape == (1000,) and 0.001 <= drawn.min() < drawn.max() <= 1.0
    assert abs(np.median(np.log(drawn)) - np.log(math.sqrt(0.001))) < 0.3, "log-uniform: the log-midpoint is the median"
    one = price.draw(np.random.default_rng(0))
    assert isinstance(one, float) and one == pytest.approx(drawn[0])


def test_a_fixed_price_is_its_own_grid_and_has_no_column():
    price = Price.fixed(0.05)
    assert not price.conditioned and price.bounds is None and price.columns == 0
    assert list(price.grid()) == [0.05] and list(price.grid(7)) == [0.05]
    assert price.column(0.05) is None
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert price.draw(rng) == 0.05 and list(price.draw(rng, size=3)) == [0.05] * 3
    assert rng.bit_generator.state == state, "a fixed price draws nothing from the episode rng"
    assert Price.fixed(0).lam == 0.0


def test_of_takes_every_spelling_of_a_price():
    assert Price.of(0.1) == Price.fixed(0.1) and Price.of((0.01, 1)) == Price.of([0.01, 1.0]) == Price.between(0.01, 1)
    price = Price.between(0.01, 1)
    assert Price.of(price) is price
    assert str(price) == "lambda in [0.01, 1]" and str(Price.fixed(0.1)) == "lambda 0.1"


@pytest.mark.parametrize("bad, message", [
    (-1, "lam must be"), (float("nan"), "lam must be"), (float("inf"), "lam must be"), ("0.1", "lam must be"),
    (True, "lam must be"), (None, "one lam or a range"),
    ((0.5, 0.1), "0 < low < high"), ((0.1, 0.1), "0 < low < high"), ((0, 1), "0 < low < high"),
    ((0.1, float("inf")), "0 < low < high"), ((float("nan"), 1), "0 < low < high"), ((0.1, 0.2, 0.3), "0 < low < high"),
])
def test_bad_prices_are_refused_with_one_project_error(bad, message):
    with pytest.raises(PriceError, match=message) as err:
        Price.of(bad)
    assert isinstance(err.value, ProjectError) and isinstance(err.value, ValueError)
    with pytest.raises(PriceError, match="one lam or a range"):
        Price(lam=0.1, low=0.01, high=1.0)


@pytest.mark.parametrize("price", [Price.fixed(0.02), Price.fixed(0), Price.between(0.0003, 0.1)])
def test_the_price_round_trips_through_an_artifacts_json(price):
    meta = json.loads(json.dumps({"lam": None, **price.to_meta()}))
    assert Price.from_meta(meta) == price
    calibrated = {**meta, "lam": 0.0123} if price.conditioned else meta  # a conditioned policy's lam is its knob
    assert Price.from_meta(calibrated) == price


def test_every_shipped_policy_json_reads_as_a_price():
    sidecars = sorted(ROOT.glob("policies/**/policy.json"))
    assert sidecars
    for sidecar in sidecars:
        meta = json.loads(sidecar.read_text())
        price = Price.from_meta(meta)
        assert price.conditioned and list(price.bounds) == meta["lam_range"]
        assert price.to_meta() == {"lam_range": meta["lam_range"]}, "the on-disk keys are the ones written"


def test_the_training_config_trains_one_price_per_policy():
    assert PolicyTrainConfig().prices == [Price.between(1e-3, 1.0)]
    sweep = PolicyTrainConfig(lam_range=None, lambdas=(0.01, 0.1))
    assert sweep.prices == [Price.fixed(0.01), Price.fixed(0.1)]
    with pytest.raises(PriceError, match="lam_range: a lambda range needs"):
        PolicyTrainConfig(lam_range=(0.5, 0.1))
    with pytest.raises(PriceError, match="lambdas: lam must be"):
        PolicyTrainConfig(lam_range=None, lambdas=(0.1, -1))
    with pytest.raises(PriceError, match="lambdas must be"):
        PolicyTrainConfig(lam_range=None, lambdas=())
