"""A latency table read back: checked against a backbone's grid, and turned into the env's price of each action.

A table is the JSON that ``evaluation.latency.measure_latency_table`` writes: per grid point ``(K, L, M)``
the ``staged_ms`` the adaptive classifier pays for an input sent there and the ``fresh_ms`` of a fixed
configuration, with where and how it was measured. Training prices actions by it (``latency_cost``), so
reading one lives here, below the measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from backbone import AdaPerceiverConfig
from backbone.errors import ProjectError
from backbone.grid import GridPoint
from backbone.io import sha256_file
from envs import FeatureSpec

LATENCY_FILE = "latency.json"
"""The latency table's name beside a policy priced by it."""
FORMAT_VERSION = 1
KINDS = ("staged", "fresh")
MEASURE = "measure one with experiments/measure_latency.py"


class LatencyTableError(ProjectError):
    """A latency table that is missing, malformed, or measured for another backbone grid."""


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


def ms_per_input(table: dict, kind: str, actions: np.ndarray, looked_again: np.ndarray | None = None) -> np.ndarray:
    """``(n,)`` ms of each input at its action ``(n, 3)``, from the ``kind`` ('staged' or 'fresh') grid, and for the
    inputs ``looked_again`` ``(n,)`` bool the second look's extension from the glance to the full configuration
    (``policy.second_look``)."""
    grid = latency_grid(table, kind)
    ms = grid[tuple(np.asarray(actions, dtype=np.int64).T)]
    if looked_again is not None and np.any(looked_again):
        if kind != "staged" or table.get("glance_ms") is None:
            raise LatencyTableError("a second look continues from the glance: time it with a staged table measured "
                                    f"with the policy's glance; {MEASURE}")
        ms = ms + np.asarray(looked_again) * float(grid[-1, -1, -1] - float(table["glance_ms"]))
    return ms


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
