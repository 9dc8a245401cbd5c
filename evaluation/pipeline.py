"""The main job: the policy training job (``policy.job``), then its one reading of the test split, the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backbone.io import json_text
from envs import OutcomeTable
from evaluation.families import FixedFamily, PolicyFamily, choose_and_apply
from evaluation.uncertainty import paired_stats
from policy.artifact import PolicyArtifact, save_policy
from policy.job import SUMMARY, PolicyJob, load_tables, train_policy_job
from policy.latency_table import LATENCY_FILE, latency_grid, ms_per_input
from policy.selection import NothingCertifiedError, PriceKnob, certified_point, images_to_certify, points_of
from policy.train import PolicyTrainConfig


def summarize(artifact: PolicyArtifact, test: OutcomeTable, calibration: OutcomeTable, config: PolicyTrainConfig,
              latency: dict | None = None) -> dict:
    """Test-split numbers of the policy (its cost included), the reference, and the fixed configuration the
    same selection rule picks on calibration (the cheapest by the policy's own cost: FLOPs, or with
    ``config.cost == 'latency'`` the ``latency`` table's fresh ms). With a ``latency`` table, ms per image too."""
    reference = test.correct[:, -1, -1, -1]
    family = PolicyFamily([artifact])
    outcome = family.outcome(test, PriceKnob(0, artifact.meta["lam"]))
    correct = outcome.predicted == test.labels
    fixed_cost = latency_grid(latency, "fresh") if config.cost == "latency" and latency is not None else None
    knob, selection, fixed = choose_and_apply(FixedFamily(test, fixed_cost), calibration, test, config.selection)
    fixed_correct = fixed.predicted == test.labels
    policy_flops = float(outcome.flops.mean())
    certified = certified_summary(artifact, family, test, config.selection)
    timing = {}
    if latency is not None:
        full_ms, policy_ms = float(latency["full_ms"]), float(ms_per_input(latency, "staged", outcome.actions, outcome.looked_again).mean())
        timing = {
            "reference_ms_per_image": full_ms,
            "policy_ms_per_image": policy_ms,
            "latency_reduction": 1 - policy_ms / full_ms,
            "latency": {key: latency.get(key) for key in ("batch_size", "threads", "device", "device_name", "torch")},
        }
    return {
        "n_test": len(test),
        "cost": config.cost,
        **timing,
        "reference_accuracy": float(reference.mean()),
        "policy_accuracy": float(correct.mean()),
        **paired_stats(correct, reference, config.selection.tolerance_pp),
        "disagreement": float(np.mean(outcome.predicted != test.predicted[:, -1, -1, -1])),
        "reference_gflops": test.full_flops / 1e9,
        "policy_gflops": policy_flops / 1e9,
        "policy_network_gflops": family.network_flops[0] / 1e9,
        "flop_reduction": 1 - policy_flops / test.full_flops,
        "lambda": artifact.meta["lam"],
        "selection": artifact.meta["selection"],
        "calibration_delta_pp": artifact.meta["calibration_delta_pp"],
        "calibration_disagreement": artifact.meta["calibration_disagreement"],
        "calibration_bound_pp": artifact.meta.get("calibration_bound_pp"),
        "meets_calibration_target": artifact.meta["meets_target"],
        "certified": certified,
        "fixed_baseline": {
            "config": list(test.configuration(knob)),
            "accuracy": float(fixed_correct.mean()),
            "delta_pp": 100 * float(fixed_correct.mean() - reference.mean()),
            "flop_reduction": 1 - float(fixed.flops.mean()) / test.full_flops,
            "meets_calibration_target": selection.meets_target,
            **({} if latency is None else {"ms_per_image": float(latency_grid(latency, "fresh")[knob])}),
        },
    }


def certified_summary(artifact: PolicyArtifact, family: PolicyFamily, test: OutcomeTable, rule) -> dict:
    """The price the artifact's operating points certify at the rule's tolerance (a disagreement with the full
    model, at the rule's delta, on the calibration split, labels not read), and what it does on test; or why
    nothing is certified."""
    try:
        point = certified_point(points_of(artifact.meta), rule.tolerance_pp)
    except NothingCertifiedError as err:
        return {"tolerance_pct": rule.tolerance_pp, "certified": False, "reason": str(err)}
    outcome = family.outcome(test, PriceKnob(0, point.lam))
    return {"tolerance_pct": rule.tolerance_pp, "certified": True, "lambda": point.lam, "delta": point.delta,
            "calibration_bound": point.bound, "calibration_n": point.n,
            "test_disagreement": float(np.mean(outcome.predicted != test.predicted[:, -1, -1, -1])),
            "test_flop_reduction": 1 - float(outcome.flops.mean()) / test.full_flops,
            **paired_stats(outcome.predicted == test.labels, test.correct[:, -1, -1, -1], rule.tolerance_pp)}


def run_policy_job(job: PolicyJob) -> dict:
    """Train (``policy.job``), score on the test split once (unless ``job.report_test`` is off), and save the
    artifact with ``summary.json`` into ``job.out``; returns the summary."""
    trained = train_policy_job(job)
    artifact = trained.artifact
    summary = {"dataset": job.dataset, "saved_to": str(job.out)}
    if job.report_test:
        test, _ = load_tables(job, ("test",), data=trained.data)
        summary |= summarize(artifact, test["test"], trained.tables["calibration"], job.train, trained.latency)
    else:
        summary |= {"test": "not read (report_test off)", "lambda": artifact.meta["lam"],
                    "selection": artifact.meta["selection"], "meets_calibration_target": artifact.meta["meets_target"],
                    "calibration_flop_reduction": artifact.meta["calibration_flop_reduction"]}
    # the policy, its summary (and its latency table) are one unit: renamed into place together
    save_policy(artifact, job.out, {**trained.extra_files, SUMMARY: json_text(summary).encode()})
    if trained.latency is None:  # a table a previous run left there is not this policy's
        (Path(job.out) / LATENCY_FILE).unlink(missing_ok=True)
    return summary


def certified_line(certified: dict | None) -> str:
    """The summary's certified claim: the price certified on calibration and its test figures, or why none is."""
    if not certified:
        return "  certified                (this policy carries no operating points)"
    tol = certified["tolerance_pct"]
    if not certified["certified"]:
        return f"  certified                {certified['reason']}"
    return (f"  certified                disagreement <= {tol:g}% with probability >= {1 - certified['delta']:g}: "
            f"price lambda {certified['lambda']:.4g} ({100 * (1 - certified['delta']):g}% bound "
            f"{100 * certified['calibration_bound']:.3f}% on {certified['calibration_n']} unlabeled calibration images); "
            f"on test: disagreement {100 * certified['test_disagreement']:.2f}%, difference {certified['delta_pp']:+.2f} pp, "
            f"FLOP reduction {100 * certified['test_flop_reduction']:.1f}%")


def format_summary(summary: dict) -> str:
    """The main job's closing lines, readable without the docs, in the vocabulary of the rule that chose."""
    if "n_test" not in summary:
        return (f"test split not read; price lambda {summary['lambda']:.4g}, calibration FLOP reduction "
                f"{100 * summary['calibration_flop_reduction']:.1f}%\n  policy saved to          {summary['saved_to']}")
    fixed, selection = summary["fixed_baseline"], summary["selection"]
    tol, mode = selection["tolerance_pp"], selection["mode"]
    low, high = summary["delta_pp_ci"]
    price = "" if summary.get("cost", "flops") == "flops" else f"{summary['cost']} "
    rel = "<=" if summary["meets_calibration_target"] else ">"
    chosen = {"certified": f"certified rule: {100 * (1 - selection.get('delta', 0.1)):g}% bound on disagreement "
                           f"{summary.get('calibration_bound_pp') or 100:.3f}% {rel} {tol:g}% on calibration",
              "certified_accuracy": f"certified accuracy rule: {100 * (1 - selection.get('delta', 0.1)):g}% bound on "
                                    f"the drop {summary.get('calibration_bound_pp') or 100:.3f} pp {rel} {tol:g} pp on "
                                    "calibration",
              "point_estimate": f"point-estimate rule: calibration drop {-(summary['calibration_delta_pp'] or 0):.2f} "
                                f"pp {rel} {tol - selection.get('margin_pp', 0):g} pp, a point estimate, not a bound"}
    lines = [
        f"test split of {summary['dataset']}: {summary['n_test']} images",
        f"  full model               {100 * summary['reference_accuracy']:.2f}%   {summary['reference_gflops'] * 1e3:.3f} MFLOPs/image",
        certified_line(summary.get("certified")),
        (f"  policy, the job's rule   {100 * summary['policy_accuracy']:.2f}%   {summary['policy_gflops'] * 1e3:.3f} MFLOPs/image"
         f" (glance and policy network included)"),
        (f"  difference               {summary['delta_pp']:+.2f} pp, 95% interval [{low:+.2f}, {high:+.2f}] pp, "
         f"P(difference < -{tol:g} pp) = {summary['p_below_tolerance']:.2f}; prediction differs from the full "
         f"model's on {100 * summary['disagreement']:.2f}% of images"),
        (f"  FLOP reduction           {100 * summary['flop_reduction']:.1f}%  ({price}price lambda {summary['lambda']:.4g}, "
         f"chosen by the {chosen[mode]}"
         + ("" if summary["meets_calibration_target"] else "; no price passed, the safest taken") + ")"),
        (f"  fixed config, same rule  {tuple(fixed['config'])}: {fixed['delta_pp']:+.2f} pp, "
         f"FLOP reduction {100 * fixed['flop_reduction']:.1f}%"
         + (f", {fixed['ms_per_image']:.3f} ms/image" if "ms_per_image" in fixed else "")),
    ]
    if "policy_ms_per_image" in summary:
        where = summary["latency"]
        lines.append(
            f"  latency (measured)       full {summary['reference_ms_per_image']:.3f} ms/image, policy "
            f"{summary['policy_ms_per_image']:.3f} ms/image ({100 * summary['latency_reduction']:.1f}% less; policy "
            f"network not timed), batch {where['batch_size']} on {where['device']}, {where['threads']} threads")
    if high - low > 2 * tol:
        lines.append(f"  note: the 95% interval is {high - low:.2f} pp wide, wider than ±{tol:g} pp: {summary['n_test']} "
                     "test images alone cannot confirm the tolerance (README: How λ and every other knob is chosen)")
    if mode == "point_estimate":
        need = images_to_certify(tol, selection.get("delta", 0.1))
        lines.append(f"  note: the job's rule is a point estimate, not a bound; a certified {tol:g}% disagreement at "
                     f"delta 0.1 needs at least {need} unlabeled images (experiments/calibrate.py on your own)")
    if "saved_to" in summary:
        lines.append(f"  policy saved to          {summary['saved_to']}")
    return "\n".join(lines)
