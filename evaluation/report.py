"""The evaluation report: every family on the test split against the full configuration.

Every deployable family is chosen by one selection rule (``policy.selection``: fixed-sequence
testing, safest first), in each of the report's selection runs: the certified rule (a bound on
disagreement, no labels) cross-fitted on two halves of the test split drawn without labels
(calibrate on one half, measure on the other, swap, pool); the certified accuracy rule (a bound
on the accuracy drop, labels) on the calibration split; and the point-estimate rule on the
calibration split. Every accuracy difference comes with its paired bootstrap interval and the
probability that it is below the tolerance, every front ratio with its bootstrap interval, and
the trained families (PPO, router) with their figures over seeds (``evaluation.uncertainty``). The hindsight fixed front, each configuration
scored on test itself, is the optimistic static bound; a family's ``front_ratio`` is its
test FLOPs over that front's FLOPs at its test accuracy (< 1: it beats every fixed
configuration, even one picked on test). Statistics come from scipy; only the throughput
column runs the backbone. Given a latency table (``evaluation.latency``), every row also has
``ms_per_image``: the table's measured ms at the configurations the family ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from backbone import AdaPerceiver, readout_flops
from envs import OutcomeTable
from evaluation.baselines import early_exit, oracle_actions, pareto_front
from evaluation.benchmark import batches_of, images_per_second
from evaluation.families import (
    TAUS,
    EarlyExitFamily,
    Family,
    FixedFamily,
    GlanceThresholdFamily,
    Outcome,
    PolicyFamily,
    RandomFamily,
    RouterFamily,
    choose_and_apply,
)
from evaluation.uncertainty import front_ratio_interval, over_seeds, paired_stats
from inference.classifier import AdaptiveClassifier
from policy.artifact import PolicyArtifact
from policy.latency_table import check_latency_table, latency_grid, ms_per_input
from policy.selection import SelectionRule

LATENCY_KEYS = ("source", "batch_size", "threads", "device", "device_name", "cpu", "torch", "backbone_hash", "rounds",
                "full_ms", "glance_ms", "note")
"""What the report says about the latency table its ``ms_per_image`` come from."""


def front_flops(front: list[dict], accuracy: float) -> float:
    """FLOPs of the cheapest point of a Pareto ``front`` at least as accurate as ``accuracy``
    (the most accurate point's FLOPs when none is)."""
    reaching = [p["flops"] for p in front if p["accuracy"] >= accuracy - 1e-12]
    return min(reaching) if reaching else max(front, key=lambda p: p["accuracy"])["flops"]


def entry(correct: np.ndarray, flops_per_input: np.ndarray | float, reference: np.ndarray, full_flops: float,
          oracle_flops: float, front: list[dict] | None = None, tolerance_pp: float = 0.1,
          grid: tuple[np.ndarray, np.ndarray] | None = None, **extra) -> dict:
    """One report row: accuracy, paired statistics against the reference, FLOPs, oracle capture, front ratio
    (with its bootstrap interval given ``grid``, every fixed configuration's ``(correct (n, G), flops (G,))``)."""
    per_input = np.broadcast_to(np.asarray(flops_per_input, dtype=np.float64), correct.shape)
    mean_flops = float(np.mean(per_input))
    saving = full_flops - mean_flops
    accuracy = float(correct.mean())
    ratio = None if front is None else mean_flops / front_flops(front, accuracy)
    return {
        "accuracy": accuracy,
        **paired_stats(correct, reference, tolerance_pp),
        "gflops": mean_flops / 1e9,
        "flop_reduction": saving / full_flops,
        "oracle_capture": saving / (full_flops - oracle_flops) if full_flops > oracle_flops else 0.0,
        "front_ratio": ratio,
        **({} if ratio is None or grid is None else {"front_ratio_bootstrap": front_ratio_interval(correct, per_input, *grid)}),
        **extra,
    }


@dataclass(frozen=True)
class SelectionRun:
    """One way of choosing every family's knob: a rule, and where it is calibrated."""

    rule: SelectionRule
    calibrate_on: str = "calibration"
    """'calibration' (the calibration split) or 'test_halves' (cross-fitted on the test split's halves)."""

    def name(self) -> str:
        return f"{self.rule.mode}_on_{self.calibrate_on}"


DEFAULT_RUNS = (
    SelectionRun(SelectionRule("certified"), "test_halves"),
    SelectionRun(SelectionRule("certified_accuracy")),
    SelectionRun(SelectionRule("point_estimate")),
)
"""The claim that holds by construction first (it is the report's top level), then the labeled ones."""


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded halves of ``n`` rows, drawn without any label (scikit-learn's split, unstratified)."""
    rows = np.arange(n)
    first, second = train_test_split(rows, test_size=0.5, random_state=seed, shuffle=True)
    return np.sort(first), np.sort(second)


def run_family(family: Family, run: SelectionRun, calibration: OutcomeTable, test: OutcomeTable,
               halves: tuple[np.ndarray, np.ndarray]) -> tuple[Outcome, list[dict]]:
    """``family`` chosen by ``run`` and applied to every test input; the selection record of each fold."""
    if run.calibrate_on == "calibration":
        folds = [(calibration, np.arange(len(test)))]
    elif run.calibrate_on == "test_halves":
        folds = [(test.subset(halves[0]), halves[1]), (test.subset(halves[1]), halves[0])]
    else:
        raise ValueError(f"calibrate_on must be 'calibration' or 'test_halves', got {run.calibrate_on!r}")
    predicted, flops = np.empty(len(test), test.predicted.dtype), np.empty(len(test))
    actions: np.ndarray | None = np.zeros((len(test), 3), np.int64)
    looked_again, any_second_look = np.zeros(len(test), bool), False
    records = []
    for calibrate, rows in folds:
        evaluation = test if len(rows) == len(test) else test.subset(rows)
        knob, selection, outcome = choose_and_apply(family, calibrate, evaluation, run.rule)
        predicted[rows], flops[rows] = outcome.predicted, outcome.flops
        if outcome.looked_again is not None:
            looked_again[rows], any_second_look = outcome.looked_again, True
        if actions is not None and outcome.actions is not None:
            actions[rows] = outcome.actions
        else:
            actions = None
        chosen = selection.scores[selection.index]
        held_out = float(np.mean(outcome.predicted != evaluation.predicted[:, -1, -1, -1]))
        records.append({**family.describe(knob), "meets_target": selection.meets_target,
                        "calibration": {k: v for k, v in chosen.items() if k != "passes"},
                        "evaluated_on": len(rows), "held_out_disagreement": held_out})
    return Outcome(predicted, flops, actions=actions, looked_again=looked_again if any_second_look else None), records


MS_NOTES = {
    "reference": "full_ms: the full configuration, one fresh pass",
    "fresh": "fresh_ms of the latency table at each input's configuration (one fresh pass)",
    "staged": ("staged_ms of the latency table at each input's action (embed, the glance and its features, the "
               "extension); the time of the chooser's network is not in the table"),
    "early_exit": ("fresh_ms at each input's exit depth (full tokens, its width) plus nothing for the readouts it "
                   "computes after every block before it to decide: a lower bound"),
    "oracle": "fresh_ms at each input's hindsight configuration",
}


def latency_columns(latency: dict | None, timing: str, actions: np.ndarray | None, note: str,
                    looked_again: np.ndarray | None = None) -> dict:
    """``ms_per_image`` (mean over the inputs, the second look's extensions included where ``looked_again``),
    ``latency_reduction`` and ``ms_note`` of a row; ``{}`` without a latency table or actions."""
    if latency is None or actions is None:
        return {}
    ms = float(np.mean(ms_per_input(latency, timing, actions, looked_again)))
    return {"ms_per_image": ms, "latency_reduction": 1 - ms / float(latency["full_ms"]), "ms_note": note}


def build_report(
    test: OutcomeTable,
    calibration: OutcomeTable,
    model: AdaPerceiver,
    policies: list[PolicyArtifact],
    images: torch.Tensor | None = None,
    policy_train: OutcomeTable | None = None,
    runs: tuple[SelectionRun, ...] = DEFAULT_RUNS,
    seed: int = 0,
    quiet: bool = False,
    latency: dict | None = None,
    seed_policies: list[PolicyArtifact] | None = None,
    router_seeds: tuple[int, ...] = (0, 1, 2),
) -> dict:
    """Every family on ``test``, its knob chosen by each selection run.

    ``policy_train`` (its table) trains the router family; without it there is no router.
    ``images`` (the test images) turns on measured throughput for the first run's families.
    ``latency`` (a table of ``evaluation.latency``, checked against the backbone) adds ``ms_per_image`` to
    every row: ``fresh_ms`` at the configurations of fixed, random, early exit (its readouts untimed, said
    in ``ms_note``) and the oracle, ``staged_ms`` at the actions of the glance threshold, the router and
    PPO. Knobs are still chosen by FLOPs, except a policy trained on latency, whose price is ranked by
    the table's ``staged_ms`` as in its training.
    """
    if latency is not None:
        check_latency_table(latency, model.config, policies[0].feature_spec if policies else None)
    c = model.config
    full_predicted = test.predicted[:, -1, -1, -1]
    ref_correct = test.correct[:, -1, -1, -1]
    oracle_acts = oracle_actions(test)
    oracle_flops = float(test.flops[tuple(oracle_acts.T)].mean())

    # the hindsight fixed front: every configuration scored on test itself (an optimistic bound)
    accuracy = test.correct.mean(axis=0)
    points = [{"config": list(test.configuration(idx)), "accuracy": float(accuracy[idx]), "flops": float(test.flops[idx]),
               "gflops": float(test.flops[idx]) / 1e9} for idx in np.ndindex(*test.grid_shape)]
    hindsight = pareto_front(points)

    tolerance_pp = runs[0].rule.tolerance_pp
    grid = (test.correct.reshape(len(test), -1), test.flops.reshape(-1))

    def row(predicted, flops, ms: dict | None = None, **extra) -> dict:
        correct = predicted == test.labels
        return {**entry(correct, flops, ref_correct, test.full_flops, oracle_flops, hindsight, tolerance_pp, grid,
                        **extra),
                "disagreement": float(np.mean(predicted != full_predicted)), **(ms or {})}

    index_batches = None if images is None else batches_of(torch.arange(len(images)), 256)

    def speed(fn: Callable[[torch.Tensor], object]) -> float | None:
        """Measured images/s of ``fn(rows)`` over the test images (None without images)."""
        return None if images is None else images_per_second(fn, index_batches, min_seconds=1.0)

    def fresh_speed(configs_of_rows: Callable[[torch.Tensor], list]) -> float | None:
        def run(rows: torch.Tensor) -> None:
            input_tokens = model.embed(images[rows])
            model.run_mixed(input_tokens, configs_of_rows(rows), model.read_kv(input_tokens))
        return speed(run)

    report: dict = {"n_test": len(test), "tolerance_pp": runs[0].rule.tolerance_pp}
    full_config = test.configuration(np.array(test.grid_shape) - 1)
    full_actions = np.tile(np.array(test.grid_shape) - 1, (len(test), 1))
    report["reference"] = row(full_predicted, test.full_flops, latency_columns(latency, "fresh", full_actions,
                                                                              MS_NOTES["reference"]),
                              config=list(full_config))
    report["oracle"] = row(test.predicted[np.arange(len(test)), *oracle_acts.T], test.flops[tuple(oracle_acts.T)],
                           latency_columns(latency, "fresh", oracle_acts, MS_NOTES["oracle"]))
    if latency is not None:
        report["latency"] = {key: latency.get(key) for key in LATENCY_KEYS}
        report["latency"]["selection"] = ("knobs are chosen by FLOPs; a policy trained on latency has its price "
                                          "ranked by this table's staged_ms, as in its training")
    report["hindsight_fixed_front"] = {
        "note": "each configuration scored on the test split itself: an optimistic bound no deployable method has",
        "front": hindsight, "points": points,
    }
    readout = readout_flops(c)
    report["early_exit_curves"] = {
        str(width): [{"tau": float(tau), "accuracy": float(r["correct"].mean()), "gflops": float(r["flops_per_input"].mean()) / 1e9}
                     for tau in TAUS for r in [early_exit(test, tau, m, readout)]]
        for m, width in enumerate(test.ffn_widths)
    }

    spec = policies[0].feature_spec if policies else None
    families: list[Family] = [FixedFamily(test), EarlyExitFamily(len(test.ffn_widths) - 1, readout),
                              RandomFamily(seed)]
    if spec is not None and spec.glance:
        glance = spec.glance_config(c)
        families.append(GlanceThresholdFamily((c.token_index(glance[0]), glance[1] - 1, c.width_index(glance[2]))))
    if policy_train is not None:
        families.append(RouterFamily(policy_train, seed=seed))
    if policies:
        families.append(PolicyFamily(policies, cost=None if latency is None else latency_grid(latency, "staged")))

    halves = split_halves(len(test), seed)
    report["halves"] = {"seed": seed, "sizes": [len(h) for h in halves], "drawn": "without labels"}
    report["selections"] = []
    work = [(run, family) for run in runs for family in families]
    results: dict[str, dict] = {run.name(): {} for run in runs}

    def run_row(run: SelectionRun, family: Family) -> dict:
        outcome, records = run_family(family, run, calibration, test, halves)
        note = MS_NOTES["early_exit"] if family.name == "early_exit" else MS_NOTES[family.timing]
        ms = latency_columns(latency, family.timing, outcome.actions, note, outcome.looked_again)
        bound = None
        if run.rule.certified:  # the largest (1 - delta) bound any fold certified its choice with
            key = "disagreement_bound" if run.rule.mode == "certified" else "drop_bound_pp"
            bound = {"statistic": run.rule.statistic, "unit": "share" if key == "disagreement_bound" else "pp",
                     "value": max(record["calibration"][key] for record in records), "delta": run.rule.delta}
        return row(outcome.predicted, outcome.flops, ms, selection={
            **run.rule.to_dict(), "calibrated_on": run.calibrate_on, "folds": records}, calibration_bound=bound)

    for run, family in tqdm(work, desc="families x selection rules", disable=quiet):
        results[run.name()][family.name] = run_row(run, family)
    # the trained families again with their other seeds: one figure per seed, then mean and sd
    seeded: dict[str, tuple[list[str], list[Family]]] = {}
    if policies and seed_policies:
        seeded["ppo"] = ([str(policies[0].meta.get("train_config", {}).get("seed", "shipped"))]
                         + [str(a.meta.get("train_config", {}).get("seed", i + 1)) for i, a in enumerate(seed_policies)],
                         [PolicyFamily([a]) for a in seed_policies])
    if policy_train is not None and len(router_seeds) > 1:
        seeded["router"] = ([str(seed)] + [str(s) for s in router_seeds if s != seed],
                            [RouterFamily(policy_train, seed=s) for s in router_seeds if s != seed])
    for name, (labels, others) in tqdm(seeded.items(), desc="other seeds", disable=quiet):
        for run in runs:
            rows = [results[run.name()][name]] + [run_row(run, family) for family in others]
            results[run.name()][name]["over_seeds"] = over_seeds(rows, labels)
    for run in runs:
        report["selections"].append({"name": run.name(), **run.rule.to_dict(), "calibrated_on": run.calibrate_on,
                                     "families": results[run.name()]})
    report.update(results[runs[0].name()])  # the first run's families at the top level

    if images is not None:
        first = results[runs[0].name()]
        fixed_config = test.configuration(first["fixed"]["selection"]["folds"][0]["index"])
        tau = first["early_exit"]["selection"]["folds"][0]["tau"]
        timed = {
            "reference": (report, lambda: fresh_speed(lambda rows: [full_config] * len(rows))),
            "fixed": (first, lambda: fresh_speed(lambda rows: [fixed_config] * len(rows))),
            "early_exit": (first, lambda: speed(lambda rows: model.forward_early_exit(images[rows], tau))),
        }
        if policies and "ppo" in first:
            knob = first["ppo"]["selection"]["folds"][0]
            classifier = AdaptiveClassifier(model, policies[knob["artifact"]], lam=knob["lam"])
            timed["ppo"] = (first, lambda: speed(lambda rows: classifier.predict(images[rows])))
        for name, (where, measure) in tqdm(timed.items(), desc="timing images/s", disable=quiet):
            where[name]["images_per_s"] = measure()
    return report
