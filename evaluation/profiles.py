"""Where a batch-1 glance's time goes, operator by operator: the per-operator floor of a path.

At batch 1 the glance (with the policy) is what every input pays, and its products are tiny, so its time is
set by how much each operator call costs, not by its arithmetic. Two profilers see two paths:

- ``onnx_profile``: ONNX Runtime's own per-node profile of the glance's session (every node it runs, fused
  ones included), grouped by operator type;
- ``torch_profile``: torch's profiler around any callable (the eager path's every aten operator; on the aot
  path only the aten calls the compiled program makes, e.g. a convolution it falls back to; its own C++
  kernels are not seen, and their time is the rest of the wall time).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from inference.classifier import AdaptiveClassifier


def _rows(total_us: dict[str, float], calls: dict[str, int], runs: int, wall_us: float) -> dict:
    """Per operator: calls and µs per run, µs per call, share of the wall time; largest first."""
    rows = [{"op": op, "calls_per_run": calls[op] / runs, "us_per_run": total_us[op] / runs,
             "us_per_call": total_us[op] / calls[op], "share_of_wall": total_us[op] / wall_us}
            for op in total_us]
    rows.sort(key=lambda r: -r["us_per_run"])
    return {"runs": runs, "wall_us_per_run": wall_us / runs,
            "calls_per_run": sum(calls.values()) / runs, "seen_us_per_run": sum(total_us.values()) / runs,
            "operators": rows}


def torch_profile(fn: Callable[[], object], runs: int = 50) -> dict:
    """``fn()`` ``runs`` times under torch's CPU profiler: self time per aten operator, per run."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # built, on a compiling path
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(runs):
            fn()
        wall = 1e6 * (time.perf_counter() - start)
    total = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.self_cpu_time_total > 0}
    calls = {e.key: e.count for e in prof.key_averages() if e.key in total}
    return _rows(total, calls, runs, wall)


def onnx_profile(classifier: AdaptiveClassifier, image: torch.Tensor, runs: int = 50) -> dict:
    """ONNX Runtime's node profile of the glance session of a fresh onnx-path twin of ``classifier``, over
    ``runs`` glances of ``image`` ``(1, C, H, W)``, grouped by operator type."""
    twin = AdaptiveClassifier(classifier.backbone, classifier.artifact, lam=classifier.lam, path="onnx")
    scratch = tempfile.mkdtemp(prefix="onnx_profile_")
    twin.runner.profiling = str(Path(scratch) / "glance")
    twin.choose(image)  # built (or loaded from the cache) and run once, profiled from here on
    start = time.perf_counter()
    for _ in range(runs):
        twin.choose(image)
    wall = 1e6 * (time.perf_counter() - start)
    session = next(built for key, built in twin.runner.programs.items() if key.kind == "glance").session
    events = json.loads(Path(session.end_profiling()).read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    # the session's first runs were untimed (building, the first glance): keep the nodes of the last ``runs`` runs
    timed = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")[-runs:]
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and timed[0][0] <= e["ts"] <= timed[-1][1]:
            op = e.get("args", {}).get("op_name", "?")
            total[op] += e["dur"]
            calls[op] += 1
    return _rows(total, calls, len(timed), wall)


def format_profile(name: str, profile: dict, top: int = 8) -> str:
    """A few lines: wall µs per run, operator calls per run and the time the profiler saw, the largest operators."""
    lines = [(f"{name}: {profile['wall_us_per_run']:.0f} µs per glance (wall), {profile['calls_per_run']:.0f} operator "
             f"calls seen, {profile['seen_us_per_run']:.0f} µs in them "
             f"({profile['seen_us_per_run'] / max(profile['calls_per_run'], 1):.1f} µs per call)")]
    lines += [f"  {r['op']:<36} {r['calls_per_run']:5.1f} calls  {r['us_per_call']:7.1f} µs/call  "
              f"{100 * r['share_of_wall']:5.1f}% of wall" for r in profile["operators"][:top]]
    return "\n".join(lines)
