"""Measured latency of every grid point on the serving machine, at the serving batch size.

A FLOP is not a millisecond: at batch 1 on a CPU, per-operator overhead, not arithmetic, sets the
time of the small configurations, so two configurations with different FLOPs may take the same
time. ``measure_latency_table`` times, per grid point ``(K, L, M)`` and per image:

- ``staged_ms``: what the adaptive classifier pays for an input sent to that point: embed, the
  read's keys and values, the glance and its features, then (except at the glance's own point,
  whose answer is the glance's) ``extend`` to the point. Without a glance: the features, then a
  fresh pass reusing the read. The policy network is not included (it is the same for every point).
- ``fresh_ms``: one fresh pass ``model.run(model.embed(x), *point)``: what a fixed configuration pays.
- ``full_ms``: the full configuration, fresh.

Every point is timed in each of ``rounds`` rounds, in a new shuffled order each round
(interleaved, so slow drifts of the machine hit every point alike), after a warm-up; a point's
figure is the median of its rounds. The table is JSON, with where and how it was measured;
``load_latency_table`` reads one back and ``check_latency_table`` refuses one measured for
another grid, architecture or glance. ``latency_cost`` is the env's price grid (staged ms over full ms).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backbone import AdaPerceiver, AdaPerceiverConfig
from backbone.errors import ProjectError
from backbone.grid import GridPoint
from backbone.io import sha256_file
from envs import FeatureSpec, features_from
from evaluation.benchmark import device_name, sync

LATENCY_FILE = "latency.json"
"""The latency table's name beside a policy priced by it."""
FORMAT_VERSION = 1
KINDS = ("staged", "fresh")
MEASURE = "measure one with experiments/measure_latency.py"


class LatencyTableError(ProjectError):
    """A latency table that is missing, malformed, or measured for another backbone grid."""


@torch.inference_mode()
def measure_latency_table(
    model: AdaPerceiver,
    spec: FeatureSpec,
    images: torch.Tensor,
    batch_size: int = 1,
    rounds: int = 5,
    repeats: int = 5,
    warmup: int = 2,
    backbone_hash: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Per-image latency (ms) of every grid point, staged and fresh, at ``batch_size`` on the model's device.

    ``images`` ``(n, C, H, W)`` in ``[0, 1]``, ``n >= batch_size``: the first ``batch_size`` are the timed batch.
    Each point is run ``warmup`` times untimed, then in each of ``rounds`` rounds (points in a new
    shuffled order each round) ``repeats`` times back to back; a round's figure is their mean, a point's
    the median over rounds. Returns the JSON-ready table (see the module docstring).
    """
    for name, value in (("batch_size", batch_size), ("rounds", rounds), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if len(images) < batch_size:
        raise ValueError(f"{len(images)} images cannot fill a batch of {batch_size}; give more images or a smaller batch")
    model.eval()
    c = model.config
    device = next(model.parameters()).device
    x = images[:batch_size].to(device)
    model.check_images(x)
    glance = GridPoint(*model.resolve(*spec.glance_config(c))) if spec.glance else None
    shape = c.grid_shape

    def staged(point: GridPoint):
        def run() -> None:  # what AdaptiveClassifier pays for an input sent to ``point``, less the policy network
            tokens = model.embed(x)
            kv = model.read_kv(tokens)
            if glance is None:
                features_from(tokens, None, spec).cpu()
                model.run(tokens, *point, read_kv=kv)
                return
            logits, state = model.glance(tokens, *glance, read_kv=kv)
            features_from(tokens, logits, spec).cpu()  # the policy reads them on the host
            if point != glance:
                model.extend(state, *point)
        return run

    def fresh(point: GridPoint):
        return lambda: model.run(model.embed(x), *point)

    tasks = []
    for index in np.ndindex(*shape):
        point = GridPoint.from_action(index, c.token_grans, c.ffn_widths)
        tasks += [("staged", index, staged(point)), ("fresh", index, fresh(point))]
    samples = {kind: np.zeros((*shape, rounds)) for kind in KINDS}
    start = time.perf_counter()
    for _, _, run in tasks:
        for _ in range(warmup):
            run()
    sync(device)
    rng = np.random.default_rng(seed)
    with tqdm(total=rounds * len(tasks), desc="timing grid points", unit="point", disable=not progress) as bar:
        for r in range(rounds):
            for t in rng.permutation(len(tasks)):
                kind, index, run = tasks[t]
                sync(device)
                begin = time.perf_counter()
                for _ in range(repeats):
                    run()
                sync(device)
                samples[kind][(*index, r)] = 1e3 * (time.perf_counter() - begin) / (repeats * batch_size)
                bar.update()
    staged_ms, fresh_ms = (np.median(samples[kind], axis=-1) for kind in KINDS)
    glance_index = None if glance is None else glance.action(c.token_grans, c.ffn_widths)
    return {
        "format": FORMAT_VERSION,
        "unit": "ms per image",
        "note": ("staged_ms: embed, read, the glance and its features, then the extension to the point (none at the "
                 "glance's own point); fresh_ms: one fresh pass at the point; full_ms: the full configuration fresh. "
                 "The policy network is not included. Each figure is the median over interleaved rounds."),
        "batch_size": batch_size,
        "rounds": rounds,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "backbone_hash": backbone_hash,
        "architecture": c.to_dict(),
        **c.grid_axes(),
        "glance": None if glance is None else list(glance),
        "features": spec.to_dict(),
        "staged_ms": staged_ms.tolist(),
        "fresh_ms": fresh_ms.tolist(),
        "full_ms": float(fresh_ms[-1, -1, -1]),
        "glance_ms": None if glance_index is None else float(staged_ms[glance_index]),
        "measured_s": round(time.perf_counter() - start, 1),
    }


REQUIRED = ("token_grans", "depths", "ffn_widths", "staged_ms", "fresh_ms", "full_ms", "batch_size")


def check_table_arrays(table: dict, source: str = "latency table") -> None:
    """Refuse a table without its keys, whose ms grids are not ``(K, L, M)`` of its own axes, or not finite and > 0."""
    if not isinstance(table, dict):
        raise LatencyTableError(f"{source}: not a latency table (a JSON object); {MEASURE}")
    missing = [key for key in REQUIRED if key not in table]
    if missing:
        raise LatencyTableError(f"{source}: missing {missing}; {MEASURE}")
    for key in ("full_ms", *(f"{kind}_ms" for kind in KINDS)):
        if _holds_a_boolean(table[key]):  # JSON true/false would read as 1.0 / 0.0 ms
            raise LatencyTableError(f"{source}: {key} holds true/false where milliseconds belong; {MEASURE}")
    try:
        shape = tuple(len(table[axis]) for axis in ("token_grans", "depths", "ffn_widths"))
        grids = {kind: np.asarray(table[f"{kind}_ms"], dtype=np.float64) for kind in KINDS}
        full = float(table["full_ms"])
    except (TypeError, ValueError) as err:
        raise LatencyTableError(f"{source}: axes and ms grids must be lists of numbers ({err}); {MEASURE}") from err
    for kind, grid in grids.items():
        if grid.shape != shape:
            raise LatencyTableError(f"{source}: {kind}_ms has shape {grid.shape}, its grid axes say {shape}; {MEASURE}")
        if not (np.isfinite(grid).all() and (grid > 0).all()):
            raise LatencyTableError(f"{source}: {kind}_ms must be finite and > 0; {MEASURE}")
    if not (np.isfinite(full) and full > 0):
        raise LatencyTableError(f"{source}: full_ms must be finite and > 0, got {full}; {MEASURE}")


def _holds_a_boolean(value) -> bool:
    """Whether ``value`` (a number or nested lists of them) contains a bool anywhere."""
    if isinstance(value, bool):
        return True
    return isinstance(value, list) and any(_holds_a_boolean(v) for v in value)


def check_latency_digest(path: str | Path, policy_meta: dict) -> None:
    """Refuse a latency table beside a policy that is not the one the policy recorded (by its sha256)."""
    recorded = (policy_meta.get("latency") or {}).get("sha256")
    if recorded is None:
        raise LatencyTableError(f"{path} lies beside a policy that records no latency table; remove it, or pass "
                                "the table you mean with --latency")
    if sha256_file(path) != recorded:
        raise LatencyTableError(f"{path} is not the latency table this policy was saved with (its sha256 differs from "
                                "the one in policy.json); restore it, or pass the table you mean with --latency")


def load_latency_table(path: str | Path) -> dict:
    """Read a latency table (JSON) and check its structure (``check_table_arrays``)."""
    path = Path(path)
    if path.is_dir():
        path = path / LATENCY_FILE
    if not path.is_file():
        raise LatencyTableError(f"latency table {path} not found; {MEASURE}")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise LatencyTableError(f"{path}: unreadable latency table ({err}); {MEASURE}") from err
    check_table_arrays(table, str(path))
    return table


def check_latency_table(table: dict, config: AdaPerceiverConfig, spec: FeatureSpec | None = None,
                        source: str = "the latency table") -> None:
    """Refuse a table measured for another grid (axes), another architecture, or (given ``spec``) another glance."""
    check_table_arrays(table, source)
    expected = config.grid_axes()
    for axis, values in expected.items():
        found = [float(v) for v in table[axis]]
        if found != [float(v) for v in values]:
            raise LatencyTableError(
                f"{source} was measured for {axis} {table[axis]}, but the backbone's are {values}; "
                f"{MEASURE} --backbone <this backbone>")
    architecture = table.get("architecture")
    ours = json.loads(json.dumps(config.to_dict()))  # tuples as JSON lists, as a table read back has them
    if isinstance(architecture, dict) and json.loads(json.dumps(architecture)) != ours:
        differ = sorted(k for k in set(architecture) | set(ours) if architecture.get(k) != ours.get(k))
        raise LatencyTableError(f"{source} was measured for another architecture (differs in {differ}); "
                                f"{MEASURE} --backbone <this backbone>")
    if spec is not None and "glance" in table:
        glance = list(spec.glance_config(config)) if spec.glance else None
        found = table["glance"]
        if (glance is None) != (found is None) or (glance is not None and [float(v) for v in found] != [float(v) for v in glance]):
            raise LatencyTableError(f"{source} was measured with the glance {found}, but the policy's features use "
                                    f"{glance}; {MEASURE} with the same features")


def latency_grid(table: dict, kind: str) -> np.ndarray:
    """``staged_ms`` or ``fresh_ms`` (``kind`` 'staged' or 'fresh') as a ``(K, L, M)`` float64 array."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return np.asarray(table[f"{kind}_ms"], dtype=np.float64)


def latency_cost(table: dict) -> np.ndarray:
    """The env's price of each action ``(K, L, M)``: staged ms over the full configuration's fresh ms."""
    return latency_grid(table, "staged") / float(table["full_ms"])


def ms_per_input(table: dict, kind: str, actions: np.ndarray) -> np.ndarray:
    """``(n,)`` ms of each input at its action ``(n, 3)``, from the ``kind`` ('staged' or 'fresh') grid."""
    return latency_grid(table, kind)[tuple(np.asarray(actions, dtype=np.int64).T)]


def format_latency_summary(table: dict) -> str:
    """A few lines: where it was measured, the full configuration and the glance, the fastest and slowest points."""
    axes = (table["token_grans"], table["ffn_widths"])
    lines = [(f"latency at batch {table['batch_size']} on {table.get('device', '?')} ({table.get('device_name', '?')}), "
              f"{table.get('threads', '?')} threads, torch {table.get('torch', '?')}: "
              f"median of {table.get('rounds', '?')} rounds")]
    full = float(table["full_ms"])
    lines.append(f"  full configuration (fresh)   {full:8.3f} ms/image")
    if table.get("glance_ms") is not None:
        lines.append(f"  glance {tuple(table['glance'])} (staged)  {table['glance_ms']:8.3f} ms/image  "
                     f"({full / table['glance_ms']:.1f}x faster than full)")
    for kind in KINDS:
        grid = latency_grid(table, kind)
        fastest, slowest = (np.unravel_index(f(grid), grid.shape) for f in (np.argmin, np.argmax))
        point = lambda i: tuple(GridPoint.from_action(i, *axes))
        lines.append(f"  {kind:<6} fastest {point(fastest)} {grid[fastest]:.3f} ms, slowest {point(slowest)} "
                     f"{grid[slowest]:.3f} ms")
    return "\n".join(lines)
