"""The load test's report: JSON, a Markdown table and a plot, written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from backbone.io import atomic_write, write_json

PARTS = ("http_and_routing", "parse", "glance_routing", "glance_queue", "glance_compute", "extension_routing",
         "extension_queue", "extension_compute", "full_routing", "full_queue", "full_compute", "ingress_other")


def _f(value, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def cpu_ceilings(cpu_per_request: dict) -> dict[str, float]:
    """Per request size (``"16"``), the full configuration's CPU ms per request over the adaptive one's, from
    ``cpu_per_request`` entries named ``"adaptive 16"`` and ``"full 16"``."""
    out = {}
    for name, found in cpu_per_request.items():
        mode, _, size = name.partition(" ")
        full = cpu_per_request.get(f"full {size}")
        if mode == "adaptive" and full and found["cpu_ms"] > 0:
            out[size] = full["cpu_ms"] / found["cpu_ms"]
    return out


def markdown(report: dict) -> str:
    o = report["options"]
    lines = [f"# Load test: {o['backbone']} + {o['policy']}, p99 target {o['p99_target_ms']:g} ms", "",
             f"`{report['command']}`", "", report["note"], "",
             "## Sustainable throughput at the p99 target", "",
             "| images/request | mode | rate (req/s) | images/s | p50 ms | p99 ms | shed | accuracy | adaptive/full |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, modes in report["sustainable"].items():
        for mode in ("adaptive", "full"):
            found = modes[mode]
            passing = [s for s in found["steps"] if s["rate"] == found["rate"]][-1:]
            s = passing[0] if passing else {}
            lines.append(f"| {size} | {mode} | {_f(found['rate'], '.3g')} | {_f(found['images_per_s'])} | "
                         f"{_f(s.get('p50_ms'))} | {_f(s.get('p99_ms'))} | {_f(100 * s['shed_share'] if s else None)}% | "
                         f"{_f(s.get('accuracy'), '.4f')} | "
                         f"{_f(modes['ratio'], '.2f') if mode == 'adaptive' else ''} |")
    lines += ["", "## Where a request's time goes (mean ms, at the sustainable rate)", "",
              "| images/request | mode | " + " | ".join(PARTS) + " |", "| --- | --- |" + " --- |" * len(PARTS)]
    for size, modes in report["sustainable"].items():
        for mode in ("adaptive", "full"):
            found = modes[mode]
            passing = [s for s in found["steps"] if s["rate"] == found["rate"]][-1:] or found["steps"][:1]
            b = passing[0]["breakdown_ms"]
            lines.append(f"| {size} | {mode} | " + " | ".join(f"{b[p]:.1f}" for p in PARTS) + " |")
    lines += ["", "## Burst (2x the default point's sustainable rate), controller on", "",
              ("Shed: refused with 503 by admission control (counted apart from errors, left out of the p50/p99, "
               "which are of the served requests)."), "",
              "| mode | phase | requests | shed | errors | p50 ms | p99 ms | images/s | accuracy | 5 s windows within target |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, burst in report["burst"].items():
        for phase, s in [*burst["phases"].items(), ("all", burst["summary"])]:
            lines.append(f"| {mode} | {phase} | {s['requests']} | {s['shed']} ({100 * s['shed_share']:.0f}%) | "
                         f"{s['errors']} | {_f(s['p50_ms'])} | "
                         f"{_f(s['p99_ms'])} | {_f(s['images_per_s'])} | {_f(s['accuracy'], '.4f')} | "
                         f"{100 * s['windows_within_target']:.0f}% of {s['windows']} |")
    lines += ["", "Controller ladder (rung: price, tolerance %, calibration bound %, MFLOPs): "
              + "; ".join(f"{i}: {p['lam']:.4g}, {p['tolerance']:g}, {100 * p['bound']:.3g}, {p['mflops']:.1f}"
                          for i, p in enumerate(report["ladder"])),
              "", "Controller moves in the adaptive burst trace (s from its start: rung): "
              + (", ".join(f"{m['t']:.1f}: {m['level']}" for m in report["controller_moves"]) or "none")
              + f"; rung at the end of the trace: {report['burst']['adaptive'].get('final_level')}",
              "", f"Admission control at the end (in-flight bound, requests shed by rule): {report.get('admission')}",
              "", "## CPU per request by process (sequential requests, no batching across them)", "",
              "| request | wall ms | CPU ms | by process (ms) |", "| --- | --- | --- | --- |"]
    for name, found in report.get("cpu_per_request", {}).items():
        lines.append(f"| {name} | {found['wall_ms']:.1f} | {found['cpu_ms']:.1f} | "
                     + ", ".join(f"{k} {v:.1f}" for k, v in found["by_process_ms"].items()) + " |")
    ceilings = cpu_ceilings(report.get("cpu_per_request", {}))
    if ceilings:
        lines += ["", ("CPU-bound ceiling of adaptive/full throughput (full CPU ms / adaptive CPU ms per request: the "
                       "ratio of the two throughputs when both modes saturate the machine's cores): "
                       + ", ".join(f"{size} images {ratio:.2f}" for size, ratio in ceilings.items()))]
    lines += ["", "## Audit on measured disagreements", "",
              "| stream | images/request | requests | audit share | disagreement | streams alarmed | median requests to alarm |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, sizes in report["audit"].items():
        for size, a in sizes.items():
            lines.append(f"| {name} | {size} | {a['requests']} | {a['share']:g} | {100 * a['rate']:.2f}% | "
                         f"{a['alarms']}/{a['streams']} | {_f(a['median_requests_to_alarm'], '.0f')} |")
    lines += ["", f"Run time {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    target = report["options"]["p99_target_ms"]
    ax = axes[0]
    for size, modes in report["sustainable"].items():
        for mode, style in (("adaptive", "-o"), ("full", "--s")):
            steps = modes[mode]["steps"]
            ax.plot([s["images_per_s"] for s in steps], [s["p99_ms"] for s in steps], style, label=f"{mode}, {size}/req")
    ax.axhline(target, color="grey", lw=1)
    ax.set(xlabel="throughput (images/s)", ylabel="p99 latency (ms)", yscale="log", title="rate search")
    ax.legend(fontsize=8)
    ax = axes[1]
    for mode, style in (("adaptive", "-"), ("full", "--")):
        line = report["burst"][mode]["timeline"]
        ax.plot([b["t"] for b in line], [b["p99_ms"] for b in line], style, label=f"{mode} p99")
    ax.axhline(target, color="grey", lw=1)
    ax.set(xlabel="s", ylabel="p99 per second (ms)", yscale="log", title="burst trace")
    twin = ax.twinx()
    line = report["burst"]["adaptive"]["timeline"]
    twin.step([b["t"] for b in line], [b["level"] if b["level"] is not None else float("nan") for b in line],
              where="post", color="black", alpha=0.5, label="controller rung")
    twin.set_ylabel("controller rung (0: default)")
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[2]
    rows = [(f"{m} {s}/req", modes[m]) for s, modes in report["sustainable"].items() for m in ("adaptive", "full")]
    bottom = [0.0] * len(rows)
    for part in PARTS:
        values = []
        for _, found in rows:
            passing = [s for s in found["steps"] if s["rate"] == found["rate"]][-1:] or found["steps"][:1]
            values.append(passing[0]["breakdown_ms"][part])
        if any(values):
            ax.bar(range(len(rows)), values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=20, fontsize=8)
    ax.set(ylabel="mean ms per request", title="where the time goes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(report: dict, stem: str) -> None:
    write_json(Path(stem + ".json"), report)
    atomic_write(Path(stem + ".md"), lambda tmp: Path(tmp).write_text(markdown(report)))
    plot(report, stem + ".png")
