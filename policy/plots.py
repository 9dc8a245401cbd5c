"""Markdown table and Pareto plot (accuracy vs GFLOPs) of an evaluation report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from backbone.checkpoint import atomic_write

FAMILIES = ("reference", "fixed", "early_exit", "random", "oracle", "ppo")


def _what(name: str, e: dict) -> str:
    if name in ("reference", "fixed"):
        return "config " + "/".join(f"{v:g}" for v in e["config"])
    if name == "early_exit":
        return f"tau {e['tau']:g}"
    if name == "ppo":
        return f"lambda {e['lam']:g}"
    if name == "random":
        return f"matched to {1e3 * e['target_gflops']:.3f} MFLOPs"
    return ""


def markdown_table(report: dict) -> str:
    """One row per family: accuracy, delta with 95% CI, McNemar p, MFLOPs, reduction, oracle capture, images/s."""
    lines = [
        "| family | what | accuracy | Δ pp [95% CI] | McNemar p | MFLOPs/image | FLOP reduction | oracle capture | images/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in FAMILIES:
        if name not in report:
            continue
        e = report[name]
        speed = "–" if e.get("images_per_s") is None else f"{e['images_per_s']:,.0f}"
        lines.append(
            f"| {name} | {_what(name, e)} | {100 * e['accuracy']:.2f}% | {e['delta_pp']:+.2f} "
            f"[{e['delta_pp_ci'][0]:+.2f}, {e['delta_pp_ci'][1]:+.2f}] | {e['mcnemar_p']:.3g} | "
            f"{1e3 * e['gflops']:.3f} | {100 * e['flop_reduction']:.1f}% | {100 * e['oracle_capture']:.1f}% | {speed} |"
        )
    if "ppo" in report:
        lines += ["", verdict(report)]
    return "\n".join(lines)


def verdict(report: dict) -> str:
    """One plain sentence: does the policy keep the tolerance and beat the best fixed config and early exit?"""
    ppo, tol = report["ppo"], report["tolerance_pp"]
    within = ppo["delta_pp"] >= -tol
    parts = [f"PPO is {'within' if within else 'NOT within'} {tol:g} pp of the reference on test ({ppo['delta_pp']:+.2f} pp)"]
    for name, label in (("fixed", "the best fixed configuration"), ("early_exit", "the best early-exit tau")):
        gain = 100 * (ppo["flop_reduction"] - report[name]["flop_reduction"])
        parts.append(f"{'saves more' if gain > 0 else 'does NOT save more'} than {label} chosen on calibration "
                     f"({gain:+.1f} pp of FLOP reduction)")
    return "; ".join(parts) + "."


def pareto_plot(report: dict, path: str | Path, title: str = "") -> None:
    """PNG of accuracy against MFLOPs/image with every family drawn."""
    fig, ax = plt.subplots(figsize=(9.5, 5))
    fixed = report["fixed"]
    ax.scatter([1e3 * p["gflops"] for p in fixed["points"]], [100 * p["accuracy"] for p in fixed["points"]],
               s=10, color="0.75", label="fixed configurations")
    ax.plot([1e3 * p["gflops"] for p in fixed["front"]], [100 * p["accuracy"] for p in fixed["front"]],
            color="0.4", lw=1.2, label="fixed: Pareto front")
    for width, curve in report["early_exit"]["curves"].items():
        ax.plot([1e3 * p["gflops"] for p in curve], [100 * p["accuracy"] for p in curve], lw=1.2,
                ls="-" if float(width) == 1.0 else ":", label=f"early exit, width {width}")
    for name, marker, color in (("random", "s", "tab:brown"), ("oracle", "*", "tab:green"), ("reference", "D", "black")):
        e = report[name]
        ax.scatter([1e3 * e["gflops"]], [100 * e["accuracy"]], marker=marker, s=90, color=color, label=name, zorder=5)
    if "ppo" in report:
        front = sorted(report["ppo"]["front"], key=lambda p: p["gflops"])
        ax.plot([1e3 * p["gflops"] for p in front], [100 * p["accuracy"] for p in front], "o-", color="tab:red",
                label="PPO policies (λ sweep)" if len(front) > 1 else "PPO policy", zorder=6)
        e = report["ppo"]
        ax.scatter([1e3 * e["gflops"]], [100 * e["accuracy"]], marker="o", s=120, facecolors="none",
                   edgecolors="tab:red", lw=2, zorder=7, label="PPO (calibrated)")
    ref = report["reference"]
    ax.axhspan(100 * ref["accuracy"] - 0.1, 100 * ref["accuracy"] + 0.1, color="tab:blue", alpha=0.1, label="reference ±0.1 pp")
    lowest = min(100 * p["accuracy"] for p in fixed["front"])
    ax.set_ylim(max(lowest, 100 * ref["accuracy"] - 8), 100 * max(report["oracle"]["accuracy"], ref["accuracy"]) + 0.5)
    ax.set_xlabel("MFLOPs per image (policy and readout costs included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
