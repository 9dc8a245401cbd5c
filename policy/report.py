"""The evaluation report: every family on the test split against the full configuration.

Statistics come from scipy (paired bootstrap, exact binomial test for McNemar),
the plot from matplotlib. Everything is computed from outcome tables; only the
throughput column runs the backbone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import binomtest

from backbone import AdaPerceiver, readout_flops
from backbone.compare import paired_interval_pp
from envs import OutcomeTable
from policy.artifact import PolicyArtifact
from policy.baselines import early_exit, matched_random_actions, oracle_actions, pareto_front
from policy.benchmark import batches_of, images_per_second
from policy.classifier import AdaptiveClassifier
from policy.evaluation import cheapest_fixed_within, evaluate_actions, fixed_accuracy, full_actions

TAUS = tuple(np.round(np.concatenate([np.linspace(0.3, 0.9, 13), [0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]]), 4))


def paired_stats(correct: np.ndarray, reference: np.ndarray, seed: int = 0) -> dict:
    """Accuracy difference in pp with a 95% paired bootstrap interval and the exact McNemar p-value."""
    diff = correct.astype(np.float64) - reference.astype(np.float64)
    ci = paired_interval_pp(diff, seed)
    lost, gained = int(np.sum(reference & ~correct)), int(np.sum(~reference & correct))
    p = 1.0 if lost + gained == 0 else binomtest(min(lost, gained), lost + gained, 0.5).pvalue
    return {"delta_pp": 100 * diff.mean(), "delta_pp_ci": [float(ci[0]), float(ci[1])], "mcnemar_p": float(p)}


def entry(correct: np.ndarray, flops_per_input: np.ndarray | float, reference: np.ndarray, full_flops: float,
          oracle_flops: float, **extra) -> dict:
    """One report row: accuracy, paired statistics against the reference, FLOPs, oracle capture."""
    mean_flops = float(np.mean(flops_per_input))
    saving = full_flops - mean_flops
    return {
        "accuracy": float(correct.mean()),
        **paired_stats(correct, reference),
        "gflops": mean_flops / 1e9,
        "flop_reduction": saving / full_flops,
        "oracle_capture": saving / (full_flops - oracle_flops) if full_flops > oracle_flops else 0.0,
        **extra,
    }


def build_report(
    test: OutcomeTable,
    calibration: OutcomeTable,
    model: AdaPerceiver,
    policies: list[PolicyArtifact],
    images: torch.Tensor | None = None,
    tolerance_pp: float = 0.1,
    seed: int = 0,
) -> dict:
    """Every family on ``test``; the best fixed configuration and early-exit tau are chosen on ``calibration``.

    ``images`` (the test images) turns on measured throughput; without it ``images_per_s`` is None.
    """
    c = model.config
    full = full_actions(test)
    reference = evaluate_actions(test, full)
    ref_correct = reference["correct"]
    oracle = evaluate_actions(test, oracle_actions(test))
    row = lambda correct, flops, **extra: entry(correct, flops, ref_correct, test.full_flops, oracle["flops"], **extra)

    # batches of row indices, so that a family can look up each input's configuration by row
    index_batches = None if images is None else batches_of(torch.arange(len(images)), 256)

    def speed(fn: Callable[[torch.Tensor], object]) -> float | None:
        """Measured images/s of ``fn(rows)`` over the test images."""
        return None if images is None else images_per_second(fn, index_batches, min_seconds=1.0)

    def throughput(assign: Callable[[torch.Tensor, tuple, torch.Tensor], list]) -> float | None:
        """Measured images/s when ``assign(input_tokens, read_kv, rows)`` picks each input's configuration."""

        def run(rows: torch.Tensor) -> None:
            input_tokens = model.embed(images[rows])
            read_kv = model.read_kv(input_tokens)
            model.run_mixed(input_tokens, assign(input_tokens, read_kv, rows), read_kv)

        return speed(run)

    report: dict = {"n_test": len(test), "tolerance_pp": tolerance_pp}
    report["reference"] = row(ref_correct, test.full_flops, config=list(test.configuration(full[0])),
                              images_per_s=throughput(lambda t, kv, rows: [test.configuration(full[0])] * len(t)))

    # fixed: every grid point; the cheapest within tolerance on calibration is the named baseline
    acc_test = fixed_accuracy(test)
    points = []
    for idx in np.ndindex(*test.grid_shape):
        points.append({"config": list(test.configuration(idx)), "accuracy": float(acc_test[idx]),
                       "flops": float(test.flops[idx]), "gflops": float(test.flops[idx]) / 1e9})
    best = cheapest_fixed_within(calibration, tolerance_pp)
    best_config = test.configuration(best)
    report["fixed"] = row(test.correct[:, best[0], best[1], best[2]], test.flops[best], config=list(best_config),
                          images_per_s=throughput(lambda t, kv, rows: [best_config] * len(t)),
                          points=points, front=pareto_front(points))

    # early exit: full tokens, every width, tau swept; the named one is full width, chosen on calibration
    readout = readout_flops(c)
    curves = {}
    for m, width in enumerate(test.ffn_widths):
        curves[str(width)] = [
            {"tau": float(tau), "accuracy": float(r["correct"].mean()), "gflops": float(r["flops_per_input"].mean()) / 1e9}
            for tau in TAUS for r in [early_exit(test, tau, m, readout)]
        ]
    cal_ref = calibration.correct[:, -1, -1, -1].mean()
    on_calibration = {tau: early_exit(calibration, tau, len(test.ffn_widths) - 1, readout) for tau in TAUS}
    feasible = [tau for tau, r in on_calibration.items() if r["correct"].mean() >= cal_ref - tolerance_pp / 100 - 1e-12]
    best_tau = min(feasible, key=lambda tau: on_calibration[tau]["flops_per_input"].mean())
    ee = early_exit(test, best_tau, len(test.ffn_widths) - 1, readout)
    ee_speed = speed(lambda rows: model.forward_early_exit(images[rows], best_tau))
    report["early_exit"] = row(ee["correct"], ee["flops_per_input"], tau=float(best_tau), images_per_s=ee_speed, curves=curves)

    # oracle
    oracle_configs = [test.configuration(a) for a in oracle_actions(test)]
    report["oracle"] = row(oracle["correct"], oracle["flops"], images_per_s=throughput(lambda t, kv, rows: [oracle_configs[i] for i in rows]))

    # ppo (the first policy is the named one; all of them form the front), and random matched to it
    ppo_rows = []
    for artifact in policies:
        overhead = test.feature_flops + artifact.network_flops()
        actions = artifact.act(test.features)
        result = evaluate_actions(test, actions, overhead)
        ppo_rows.append(row(result["correct"], result["flops"], lam=artifact.meta.get("lam"), overhead_gflops=overhead / 1e9))
    if ppo_rows:
        classifier = AdaptiveClassifier(model, policies[0])
        report["ppo"] = {**ppo_rows[0], "images_per_s": throughput(lambda t, kv, rows: classifier.choose(t, kv)),
                         "front": [dict(t) for t in dict.fromkeys(
                             tuple((k, r[k]) for k in ("lam", "accuracy", "gflops", "delta_pp")) for r in ppo_rows)]}
        target = ppo_rows[0]["gflops"] * 1e9
    else:
        target = report["fixed"]["gflops"] * 1e9
    random_actions = matched_random_actions(test, target, seed)
    random_eval = evaluate_actions(test, random_actions)
    random_configs = [test.configuration(a) for a in random_actions]
    report["random"] = row(random_eval["correct"], random_eval["flops"], target_gflops=target / 1e9,
                           images_per_s=throughput(lambda t, kv, rows: [random_configs[i] for i in rows]))
    return report
