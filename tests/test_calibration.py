"""Calibration on unlabeled images: a known price on a table built for it, the refusals, and the CLI end to end."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import synthetic_table

from backbone.checkpoint import backbone_hash, load_checkpoint
from backbone.data import SplitConfig, load_dataset
from backbone.errors import ProjectError
from envs import Price
from envs.price import GRID
from evaluation.families import PolicyFamily
from evaluation.report import SelectionRun, run_family, split_halves
from policy.artifact import load_policy
from policy.calibration import CalibrationError, calibrate, price_curve
from policy.selection import NothingCertifiedError, SelectionRule, certified_point, points_of

LAMS = np.geomspace(0.001, 1.0, GRID)
STUB_PRICE = Price.between(0.001, 1.0)


@dataclasses.dataclass
class StubPolicy:
    """Acts by a rule that depends on the price only: at the i-th price of the grid it sends the first
    ``full_rows[i]`` inputs to the full configuration (action (1, 0, 0)) and answers the rest with the glance."""

    full_rows: list[int]
    price: Price = STUB_PRICE
    meta: dict = dataclasses.field(default_factory=lambda: {"lam": None})
    second_look: float | None = None

    def network_flops(self) -> int:
        return 0

    def act(self, features: np.ndarray, lam: float) -> np.ndarray:
        i = int(np.argmin(np.abs(LAMS - lam)))
        actions = np.zeros((len(features), 3), np.int64)
        actions[: self.full_rows[i], 0] = 1
        return actions


def table_with_glance_errors(n: int, wrong: int):
    """Grid (2, 1, 1): the glance (staged 10 FLOPs) disagrees with the full configuration (100) on rows < ``wrong``."""
    agree = np.ones((n, 2, 1, 1), bool)
    agree[:wrong, 0, 0, 0] = False
    return synthetic_table(np.ones((n, 2, 1, 1), bool), agree=agree, staged=np.array([10, 100])[:, None, None])


def stub_rows(first_pass_end: int = 10) -> list[int]:
    # prices 0..10 route >= 12 of the first rows to the full configuration (the 10 glance errors among them),
    # 11..49 only 5 (5 disagreements: fail), 50 exactly the 10 errors (passes again, and is the cheapest)
    rows = [32 - 2 * i if i <= first_pass_end else 5 for i in range(GRID)]
    rows[50] = 10
    return rows


def test_calibration_picks_the_known_price_and_stops_at_the_first_failure():
    table = table_with_glance_errors(3000, wrong=10)
    rule = SelectionRule("certified", tolerance_pp=0.1, delta=0.1)
    stub = StubPolicy(stub_rows())
    calibrated, point = calibrate(stub, table, rule, "stub images")
    assert point.lam == pytest.approx(LAMS[10]), "the cheapest price before the first failure (index 11)"
    assert point.disagreement == 0 and point.n == 3000
    points = points_of(calibrated.meta)
    assert [p.lam for p in points] == pytest.approx(list(LAMS)) and calibrated.meta["lam"] == point.lam
    assert calibrated.meta["operating_points"]["labels_read"] is False
    # the cheapest passing point anywhere is price 50, which the valid rule never reaches
    passing = [p for p in points if p.bound <= 0.001]
    assert min(passing, key=lambda p: p.mflops).lam == pytest.approx(LAMS[50])
    # a looser tolerance passes 1 in 3,000 too (bound 0.13%) but not 5 (0.31%): still the same stop
    assert certified_point(points, 0.2).lam == pytest.approx(LAMS[10])
    # at 0.5% the whole curve passes: the cheapest (5 rows to the full model), ties to the lowest price
    assert certified_point(points, 0.5).lam == pytest.approx(LAMS[11])


def test_calibration_refuses_what_it_cannot_certify():
    rule = SelectionRule("certified", tolerance_pp=0.1, delta=0.1)
    with pytest.raises(CalibrationError, match="needs at least 2302 images"):
        calibrate(StubPolicy(stub_rows()), table_with_glance_errors(2000, wrong=0), rule, "few")
    # the safest price already disagrees on 5 inputs: nothing is certified, and the message says what would be
    with pytest.raises(CalibrationError, match=r"ask for a tolerance of at least 0\.3"):
        calibrate(StubPolicy([5] * GRID), table_with_glance_errors(3000, wrong=10), rule, "bad")
    with pytest.raises(CalibrationError, match="fixed price"):
        price_curve(StubPolicy(stub_rows(), price=Price.fixed(0.1)), table_with_glance_errors(3000, 0), 0.1)
    with pytest.raises(NothingCertifiedError, match="no operating points"):
        certified_point([], 0.1)


@pytest.fixture(scope="module")
def digits_half(tiny_run, tmp_path_factory):
    """The first unlabeled half of the digits test split as an .npz with 'x' only."""
    out = tmp_path_factory.mktemp("calibrate")
    test = load_dataset("digits", None, SplitConfig(seed=0)).splits["test"]
    halves = split_halves(len(test.y))
    # float in [0, 1], exactly the split's pixels; 'y' is garbage that would be refused if calibration read it
    np.savez(out / "half.npz", x=test.x[halves[0]].numpy(), y=np.full(7, -5))
    np.savez(out / "half_x.npz", x=test.x[halves[0]].numpy())
    return out, halves


def test_calibrate_cli_reproduces_the_reports_certified_choice(tiny_run, digits_half):
    from experiments import calibrate as calibrate_cli
    from experiments import infer
    from policy.job import PolicyJob, load_tables

    root, _ = tiny_run
    out, halves = digits_half
    argv = ["--backbone", str(root / "backbone"), "--policy", str(root / "policy"), "--unlabeled", str(out / "half.npz"),
            "--tolerance", "40", "--out", str(out / "calibrated"), "--quiet", "--json", str(out / "c.json")]
    result = calibrate_cli.main(argv)
    artifact = load_policy(out / "calibrated", backbone_hash(root / "backbone"))
    assert artifact.meta["lam"] == result["chosen"]["lam"] and len(points_of(artifact.meta)) == GRID
    # the report's certified run, calibrated on the same half of the same test split, picks the same price
    tables, _ = load_tables(PolicyJob(backbone=str(root / "backbone"), cache_dir=str(root / "cache"), quiet=True),
                            ("calibration", "test"))
    run = SelectionRun(SelectionRule("certified", tolerance_pp=40), "test_halves")
    _, records = run_family(PolicyFamily([load_policy(root / "policy")]), run, tables["calibration"], tables["test"],
                            halves)
    assert records[0]["lam"] == pytest.approx(result["chosen"]["lam"])
    # infer.py at that tolerance uses the certified price; a tolerance nothing certifies is one clear error
    images = out / "half_x.npz"
    ran = infer.main(["--backbone", str(root / "backbone"), "--policy", str(out / "calibrated"), "--input", str(images),
                      "--tolerance", "40"])
    assert ran["totals"]["images"] == len(halves[0])
    with pytest.raises(NothingCertifiedError, match="ask for a tolerance of at least"):
        infer.main(["--backbone", str(root / "backbone"), "--policy", str(out / "calibrated"), "--input", str(images),
                    "--tolerance", "0.001"])
    assert json.loads((out / "c.json").read_text())["chosen"]["lam"] == result["chosen"]["lam"]


def test_calibrate_cli_refusals_leave_nothing_behind(tiny_run, digits_half, tmp_path):
    from experiments import calibrate as calibrate_cli

    root, _ = tiny_run
    out, _ = digits_half
    base = ["--backbone", str(root / "backbone"), "--policy", str(root / "policy"), "--quiet"]
    with pytest.raises(CalibrationError, match="needs at least 2302 images"):  # 135 images at 0.1%
        calibrate_cli.main([*base, "--unlabeled", str(out / "half.npz"), "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
    np.savez(tmp_path / "wrong.npz", x=np.zeros((3000, 1, 4, 4), np.uint8))
    with pytest.raises(ProjectError, match="images are 1x4x4 .* this backbone takes 1x8x8"):
        calibrate_cli.main([*base, "--unlabeled", str(tmp_path / "wrong.npz"), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        calibrate_cli.main([*base, "--unlabeled", str(out / "half.npz"), "--out", str(tmp_path / "c"), "--tolerance", "nan"])


def test_classifier_takes_the_tolerance_or_a_price_not_both(tiny_run, digits_half):
    from inference.classifier import AdaptiveClassifier

    root, _ = tiny_run
    out, _ = digits_half
    if not (out / "calibrated").is_dir():
        pytest.skip("needs the calibrated policy of the CLI test")
    model = load_checkpoint(root / "backbone")
    artifact = load_policy(out / "calibrated")
    classifier = AdaptiveClassifier(model, artifact, tolerance=40)
    assert classifier.lam == certified_point(points_of(artifact.meta), 40).lam
    with pytest.raises(ValueError, match="not both"):
        AdaptiveClassifier(model, artifact, lam=0.1, tolerance=40)
    x = torch.zeros(2, 1, 8, 8)
    assert len(classifier.predict(x).configs) == 2


@dataclasses.dataclass
class RankedStub:
    """Sends the inputs whose rank (feature 0) is below ``40 - 4 * position`` to the full configuration and
    answers the rest with the glance; ``position`` runs continuously from 0 (lowest price) to 60 (highest)."""

    price: Price = STUB_PRICE
    meta: dict = dataclasses.field(default_factory=lambda: {"lam": None})
    second_look: float | None = None

    def network_flops(self) -> int:
        return 0

    def act(self, features: np.ndarray, lam: float) -> np.ndarray:
        position = 60 * np.log(lam / self.price.low) / np.log(self.price.high / self.price.low)
        actions = np.zeros((len(features), 3), np.int64)
        actions[features[:, 0] < 40 - 4 * position, 0] = 1
        return actions


def test_development_scans_the_price_grid_it_is_given():
    # each unlabeled half holds 10 glance errors at ranks 0-9, so a half passes (no disagreement in 3,000)
    # while at least 10 ranks go to the full model: up to position 7.5. 61 prices stop at 7, 241 at 7.5
    from evaluation.development import develop

    n = 6000
    ranks = np.zeros(n, np.float32)
    for half in split_halves(n, 0):
        ranks[half] = np.arange(len(half))
    agree = np.ones((n, 2, 1, 1), bool)
    agree[ranks < 10, 0, 0, 0] = False
    table = dataclasses.replace(synthetic_table(np.ones((n, 2, 1, 1), bool), agree=agree,
                                                staged=np.array([10, 100])[:, None, None]),
                                features=np.stack([ranks, ranks], axis=1))
    rule = SelectionRule("certified", tolerance_pp=0.1, delta=0.1)
    coarse, fine = (develop(RankedStub(), table, rule, prices=p) for p in (GRID, 241))
    assert coarse["prices"] == GRID and fine["prices"] == 241
    assert coarse["lams"] == pytest.approx([np.geomspace(0.001, 1.0, 241)[28]] * 2)  # position 7
    assert fine["lams"] == pytest.approx([np.geomspace(0.001, 1.0, 241)[30]] * 2)  # position 7.5
    assert fine["flop_reduction"] > coarse["flop_reduction"] and fine["max_held_out_disagreement"] == 0
