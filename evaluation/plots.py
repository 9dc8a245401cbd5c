"""Markdown table and Pareto plot (accuracy vs GFLOPs) of an evaluation report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from backbone.grid import GridPoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from backbone.io import atomic_write

FAMILIES = ("fixed", "early_exit", "random", "glance_threshold", "router", "ppo")


def _what(name: str, e: dict) -> str:
    """The knob(s) the rule chose, one per calibration fold."""
    if name in ("reference",):
        return "config " + GridPoint(*e["config"]).name
    if name == "oracle":
        return "hindsight, per input"
    parts = []
    for fold in e["selection"]["folds"]:
        mark = "" if fold["meets_target"] else " †"
        if name == "fixed":
            parts.append("config " + GridPoint(*fold["config"]).name + mark)
        elif name in ("early_exit", "glance_threshold"):
            parts.append(f"tau {fold['tau']:.4g}" + mark)
        elif name == "ppo":
            parts.append(f"lambda {fold['lam']:.3g}" + mark)
        elif name == "random":
            parts.append(f"{100 * fold['target_flop_fraction']:.0f}% of full" + mark)
        elif name == "router":
            parts.append(f"eps {fold['epsilon']:.2g}" + mark)
    return ", ".join(parts)


def _bound(name: str, e: dict) -> str:
    """The calibration bound the rule certified the chosen knob with (the largest over folds), or '–'."""
    if name in ("reference", "oracle"):
        return ""
    bound = e.get("calibration_bound")
    if bound is None:
        return "– (point estimate)"
    return f"{100 * bound['value']:.3f}%" if bound["unit"] == "share" else f"{bound['value']:.3f} pp"


def _seeds(e: dict, key: str, scale: float, fmt: str) -> str:
    """`` (mean ± sd over n seeds)`` of a trained family's figure, or nothing."""
    seeds = e.get("over_seeds")
    if not seeds or key not in seeds:
        return ""
    return f" ({format(scale * seeds[key]['mean'], fmt)} ± {format(scale * seeds[key]['sd'], fmt)}, {seeds['n_seeds']} seeds)"


def _row(name: str, e: dict) -> str:
    speed = "–" if e.get("images_per_s") is None else f"{e['images_per_s']:,.0f}"
    ratio = "–" if e.get("front_ratio") is None else f"{e['front_ratio']:.2f}"
    if "front_ratio_bootstrap" in e:
        low, high = e["front_ratio_bootstrap"]["ci"]
        ratio += f" [{low:.2f}, {high:.2f}]"
    chance = "" if name == "reference" else f"{e['p_below_tolerance']:.2f}"
    return (f"| {name} | {_what(name, e)} | {100 * e['accuracy']:.2f}% | {e['delta_pp']:+.2f} "
            f"[{e['delta_pp_ci'][0]:+.2f}, {e['delta_pp_ci'][1]:+.2f}]{_seeds(e, 'delta_pp', 1, '+.2f')} | {chance} | "
            f"{100 * e['disagreement']:.2f}% | {_bound(name, e)} | {1e3 * e['gflops']:.3f} | "
            f"{100 * e['flop_reduction']:.1f}%{_seeds(e, 'flop_reduction', 100, '.1f')} | {ratio} | "
            f"{100 * e['oracle_capture']:.1f}% | {speed} |"
            + ("" if "ms_per_image" not in e else f" {e['ms_per_image']:.3f} |"))


RULE_TITLES = {
    "certified": "certified rule: a {confidence} upper bound on disagreement with the full model, no labels",
    "certified_accuracy": "certified accuracy rule: a {confidence} upper bound on the accuracy drop, labels",
    "point_estimate": "point-estimate rule: the calibration accuracy drop, labels (margin {margin} pp; not a bound)",
}


def markdown_table(report: dict) -> str:
    """One table per selection run: each family's test accuracy, Δ with its 95% interval (and over seeds),
    P(Δ < −tolerance), disagreement with the full model, the bound certified on calibration, MFLOPs, reduction,
    front ratio with its interval, oracle capture and images/s; then the verdict."""
    tol = report["tolerance_pp"]
    header = [
        (f"| family | chosen | accuracy | Δ pp [95% CI] | P(Δ < −{tol:g} pp) | disagreement | bound on calibration "
         "| MFLOPs/image | FLOP reduction | front ratio [95% CI] | oracle capture | images/s |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if "ms_per_image" in report["reference"]:  # a measured latency table was given: ms per image beside FLOPs
        batch = (report.get("latency") or {}).get("batch_size", "?")
        header = [header[0] + f" ms/image (batch {batch}) |", header[1] + " ---: |"]
    lines = []
    for run in report["selections"]:
        title = RULE_TITLES[run["mode"]].format(confidence=f"{100 * (1 - run.get('delta', 0.1)):g}%",
                                                margin=run.get("margin_pp"))
        lines += [(f"**{title}**; tolerance {run['tolerance_pp']:g}{'%' if run['mode'] == 'certified' else ' pp'}, "
                   f"fixed-sequence over each family's candidates, calibrated on {run['calibrated_on'].replace('_', ' ')}:"),
                  "", *header]
        lines.append(_row("reference", report["reference"]))
        lines += [_row(name, run["families"][name]) for name in FAMILIES if name in run["families"]]
        lines.append(_row("oracle", report["oracle"]))
        lines += ["", verdict(run, tol), ""]
        if any(not f["meets_target"] for e in run["families"].values() for f in e["selection"]["folds"]):
            lines += [("† the family's safest candidate already failed on calibration: nothing certified, the safest "
                       "taken."), ""]
    return "\n".join(lines).rstrip()


def verdict(run: dict, tolerance_pp: float) -> str:
    """One plain sentence: what the rule guarantees, and which family saves the most under it."""
    families = run["families"]
    passed = {n: e for n, e in families.items() if all(f["meets_target"] for f in e["selection"]["folds"])}
    if not passed:
        return "No family had a candidate pass on calibration."
    best = max(passed, key=lambda n: passed[n]["flop_reduction"])
    e = passed[best]
    ranking = ", ".join(f"{n} {100 * passed[n]['flop_reduction']:.1f}%" for n in
                        sorted(passed, key=lambda n: -passed[n]["flop_reduction"]))
    low, high = e["delta_pp_ci"]
    seeds = e.get("over_seeds")  # its worst fold covers every seed, the shipped one too
    worst = (seeds["worst_held_out_disagreement"] if seeds
             else max(fold["held_out_disagreement"] for fold in e["selection"]["folds"]))
    measured = (f"measured on held-out inputs: Δ {e['delta_pp']:+.2f} pp [{low:+.2f}, {high:+.2f}], "
                f"P(Δ < −{tolerance_pp:g} pp) = {e['p_below_tolerance']:.2f}, disagreement {100 * e['disagreement']:.2f}% "
                f"(worst held-out fold{' of any seed' if seeds else ''} {100 * worst:.2f}%)")
    if run["mode"] == "point_estimate":
        return (f"Chosen on a point estimate (no guarantee): {ranking} (FLOP reduction); {best} saves the most, "
                f"{measured}.")
    what = "disagreement" if run["mode"] == "certified" else "accuracy drop"
    return (f"Certified on calibration ({what} ≤ {tolerance_pp:g}{'%' if what == 'disagreement' else ' pp'} with "
            f"probability ≥ {1 - run['delta']:g} per fold): {ranking} (FLOP reduction); {best} saves the most, {measured}.")


def pareto_plot(report: dict, path: str | Path, title: str = "") -> None:
    """PNG of accuracy against MFLOPs/image with every family drawn."""
    fig, ax = plt.subplots(figsize=(9.5, 5))
    fixed = report["hindsight_fixed_front"]
    ax.scatter([1e3 * p["gflops"] for p in fixed["points"]], [100 * p["accuracy"] for p in fixed["points"]],
               s=10, color="0.75", label="fixed configurations (scored on test)")
    ax.plot([1e3 * p["gflops"] for p in fixed["front"]], [100 * p["accuracy"] for p in fixed["front"]],
            color="0.4", lw=1.2, label="hindsight fixed front")
    for width, curve in report["early_exit_curves"].items():
        ax.plot([1e3 * p["gflops"] for p in curve], [100 * p["accuracy"] for p in curve], lw=1.2,
                ls="-" if float(width) == 1.0 else ":", label=f"early exit, width {width}")
    markers = {"fixed": ("P", "tab:gray"), "early_exit": ("v", "tab:blue"), "random": ("s", "tab:brown"),
               "glance_threshold": ("^", "tab:purple"), "router": ("X", "tab:orange"), "ppo": ("o", "tab:red"),
               "oracle": ("*", "tab:green"), "reference": ("D", "black")}
    for run, fill in zip(report["selections"], ("full", "none"), strict=False):
        for name, e in run["families"].items():
            marker, color = markers[name]
            ax.scatter([1e3 * e["gflops"]], [100 * e["accuracy"]], marker=marker, s=90, zorder=6,
                       facecolors=color if fill == "full" else "none", edgecolors=color, lw=1.5,
                       label=f"{name} ({run['mode']})")
    for name in ("oracle", "reference"):
        marker, color = markers[name]
        e = report[name]
        ax.scatter([1e3 * e["gflops"]], [100 * e["accuracy"]], marker=marker, s=90, color=color, label=name, zorder=5)
    ref = report["reference"]
    ax.axhspan(100 * ref["accuracy"] - 0.1, 100 * ref["accuracy"] + 0.1, color="tab:blue", alpha=0.1, label="reference ±0.1 pp")
    shown = [p["accuracy"] for p in fixed["front"]] + [e["accuracy"] for run in report["selections"]
                                                      for e in run["families"].values()]
    low = max(min(shown), ref["accuracy"] - 0.03)
    ax.set_ylim(100 * low - 0.3, 100 * max(report["oracle"]["accuracy"], ref["accuracy"]) + 0.3)
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image, log scale (glance, policy and readout costs included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def latency_plot(latency: dict, path: str | Path, title: str = "") -> None:
    """PNG of batch-1 latency (p50, with p90-p99 whiskers) against FLOPs per image, one point per variant."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    variants = latency["variants"]
    full = variants["full"]
    for name, v in variants.items():
        color = "black" if name == "full" else "tab:red" if name == "adaptive" else "tab:blue"
        ax.errorbar([1e3 * v["gflops"]], [v["p50"]], yerr=[[0], [v["p99"] - v["p50"]]], fmt="o", color=color, capsize=3)
        ax.annotate(name.removeprefix("config "), (1e3 * v["gflops"], v["p50"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    mflops = [1e3 * v["gflops"] for v in variants.values()]
    xs = [min(mflops), max(mflops)]
    ax.plot(xs, [full["p50"] * x / (1e3 * full["gflops"]) for x in xs], ls=":", color="0.5",
            label="time proportional to FLOPs (through the full model)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MFLOPs per image (log)")
    ax.set_ylabel("ms per image at batch 1, p50 (whisker: p99)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
