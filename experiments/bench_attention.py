"""Time the two CPU attention kernels of the compiled paths per score tile (queries x keys), at batch 1 and 256.

    python experiments/bench_attention.py --json reports/bench_attention_cpu.json

Each kernel (torch's fused ``scaled_dot_product_attention``, and ``matmul_softmax``: two matrix products around a
softmax) is compiled on the chosen path for each shape, then timed call by call; each figure is the median call.
The last column is the kernel ``backbone.layers.matmul_softmax_on_cpu`` picks for that tile in compiled graphs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from backbone.errors import HelpFormatter, positive_int, positive_ints, run_cli
from backbone.io import check_output_path, write_json
from backbone.layers import matmul_softmax, matmul_softmax_on_cpu
from inference.paths import KERNEL_BUILDERS, compile_kernel, runner_class

KERNELS = {"fused": lambda q, k, v: F.scaled_dot_product_attention(q, k, v), "matmul_softmax": matmul_softmax}
TILES = "4x49,4x4,1x4,8x8,8x49,16x16,16x49,32x32,32x49,1x8,1x32"
"""The glance's read, block and write; the extensions' 8 and 16 latents; the full model's 32; a single query."""


def tiles(text: str) -> list[tuple[int, int]]:
    """``"4x49,32x32"`` -> ``[(4, 49), (32, 32)]``."""
    try:
        found = [tuple(int(n) for n in tile.split("x")) for tile in text.split(",")]
    except ValueError:
        found = []
    if not found or any(len(t) != 2 or min(t) < 1 for t in found):
        raise argparse.ArgumentTypeError(f"expected tiles as QUERIESxKEYS,... (e.g. 4x49,32x32), got {text!r}")
    return found


def median_call_us(fn, args: tuple, calls: int, warmup: int = 10) -> float:
    """Median microseconds of one ``fn(*args)`` over ``calls`` calls."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


@torch.inference_mode()
def time_kernels(shapes: list[tuple[int, int]], batch_sizes: list[int], heads: int, head_dim: int, path: str,
                 progress: bool = True) -> list[dict]:
    """One row per (tile, batch size): microseconds per call of each kernel on ``path``, and the rule's pick."""
    rows = []
    steps = [(tile, name) for tile in shapes for name in KERNELS]
    compiled = {}
    for (nq, nk), name in tqdm(steps, desc="compiling kernels", disable=not progress):
        args = tuple(torch.randn(max(batch_sizes), heads, n, head_dim) for n in (nq, nk, nk))
        compiled[(nq, nk), name] = compile_kernel(path, KERNELS[name], args, ("batch",) * 3)
    for (nq, nk) in shapes:
        for b in batch_sizes:
            args = tuple(torch.randn(b, heads, n, head_dim) for n in (nq, nk, nk))
            calls = max(20, 2000 // b)
            us = {name: median_call_us(compiled[(nq, nk), name], args, calls) for name in KERNELS}
            pick = "matmul_softmax" if matmul_softmax_on_cpu(nq, nk, compiled=True) else "fused"
            rows.append({"queries": nq, "keys": nk, "batch_size": b, **{f"{k}_us": v for k, v in us.items()},
                         "faster": min(us, key=us.get), "rule_picks": pick})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| queries x keys | batch | fused us | matmul-softmax us | faster | rule picks |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['queries']}x{r['keys']} | {r['batch_size']} | {r['fused_us']:,.1f} | "
                     f"{r['matmul_softmax_us']:,.1f} | {r['faster']} | {r['rule_picks']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--tiles", type=tiles, default=tiles(TILES), help=f"QUERIESxKEYS,... (default {TILES})")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 256], help="comma-separated batch sizes")
    parser.add_argument("--heads", type=positive_int, default=16, help="attention heads")
    parser.add_argument("--head-dim", type=positive_int, default=8, help="width of one head")
    parser.add_argument("--path", choices=tuple(KERNEL_BUILDERS), default="aot", help="eager: no compiling (a quick check)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    runner_class(args.path)  # a compiling path without a C++ compiler: one line, before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = time_kernels(args.tiles, args.batch_sizes, args.heads, args.head_dim, args.path, not args.quiet)
    print(f"{args.path} path, {torch.get_num_threads()} threads, {args.heads} heads of {args.head_dim} dims\n")
    print(format_rows(rows))
    if args.json:
        write_json(args.json, {"path": args.path, "threads": torch.get_num_threads(), "heads": args.heads,
                               "head_dim": args.head_dim, "torch": torch.__version__, "rows": rows})
    return rows


if __name__ == "__main__":
    run_cli(main)
