"""Speed of the full configuration, the adaptive classifier and a naive largest-in-batch variant.

Images/s at a batch size (``benchmark_inference``), per-image latency percentiles at batch 1
(``latency_batch1``), and the machine's measured matrix-multiply throughput (``matmul_peak``),
so that every path's achieved GFLOP/s can be read as a share of what this machine can do.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from backbone import flops, measure_flops
from backbone.grid import GridPoint
from inference.classifier import AdaptiveClassifier
from inference.plan import plan_extensions

KEYS = ("full_images_per_s", "adaptive_images_per_s", "naive_images_per_s", "flop_speedup", "realized_speedup",
        "efficiency")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA calls return before the work is done; time only finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    """The accelerator's name, or the CPU's (``platform.processor()``, else the machine type)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def batches_of(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Full batches of ``images`` (a ragged tail would time another batch size), or all images if fewer."""
    return [images[i : i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)] or [images]


def images_per_second(fn: Callable[[torch.Tensor], object], batches: list[torch.Tensor], warmup: int = 3,
                      min_seconds: float = 2.0) -> float:
    """Images/s of ``fn(batch)``: ``warmup`` untimed batches, then whole passes over ``batches`` for >= ``min_seconds``.

    Whole passes keep every variant on the same images, so the adaptive mix of configurations is the same.
    """
    device = batches[0].device
    with torch.inference_mode():
        for i in range(warmup):
            fn(batches[i % len(batches)])
        sync(device)
        done, start = 0, time.perf_counter()
        while True:
            for batch in batches:
                fn(batch)
                done += len(batch)
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return done / elapsed


def largest_in_batch(configs: list[GridPoint]) -> GridPoint:
    """The naive choice: each axis at the largest value any input of the batch was given.

    The grid's axes are strictly increasing, so the largest value is the one at the largest index.
    """
    return max(c[0] for c in configs), max(c[1] for c in configs), max(c[2] for c in configs)


def benchmark_inference(classifier: AdaptiveClassifier, images: torch.Tensor, batch_size: int,
                        min_seconds: float = 1.0, warmup: int = 3, rounds: int = 3, progress: bool = False) -> dict:
    """Images/s of full, adaptive and naive inference on ``images`` ``(N, C, H, W)`` at one batch size; also of the
    glance's grid point alone, and of the same classifier with the other extension-pass rule (merged or not).

    All are measured in the same run on the same batches, interleaved over ``rounds`` rounds
    of at least ``min_seconds`` each; each variant's speed is its median round, so a burst of load
    on a shared machine moves one round, not the ratio. FLOPs are per image (policy included where paid).
    """
    model = classifier.backbone
    c = model.config
    batches = batches_of(images.to(next(model.parameters()).device), batch_size)

    def naive(x: torch.Tensor) -> torch.Tensor:
        choice = classifier.choose(x)
        largest, glance = largest_in_batch(choice.configs), choice.glance
        if glance.state is None:
            return model.run(glance.input_tokens, *largest)
        return glance.logits if largest == glance.state.config else classifier.extend(glance.state, largest)

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    full = GridPoint(*model.resolve(None, None, None))

    # the same classifier with the other extension-pass rule (merged or not), on the same runner
    other = "unmerged" if classifier.merge_passes else "merged"  # what the other rule buys, in the same rounds
    variants = {"full": lambda x: classifier.forward_config(x, full), "adaptive": classifier.predict, "naive": naive,
                other: classifier.with_merge_passes(not classifier.merge_passes).predict}
    glance = classifier.glance_point
    if glance is not None:  # the glance's grid point alone, fresh: what the classifier pays at the least
        variants["glance"] = lambda x: classifier.forward_config(x, glance)
    with torch.inference_mode():  # untimed: the compiled paths compile each function (and batch size) on first use
        for fn in variants.values():
            for batch in batches:
                fn(batch)
    measured = {name: [] for name in variants}
    steps = [(r, name) for r in range(rounds) for name in variants]
    for r, name in tqdm(steps, desc=f"batch {batch_size}: rounds x variants", disable=not progress):
        measured[name].append(images_per_second(variants[name], batches, warmup, min_seconds))
    speed = {name: float(np.median(values)) for name, values in measured.items()}
    predictions = [classifier.predict(batch) for batch in batches]
    adaptive_flops = float(np.mean(np.concatenate([p.flops for p in predictions])))
    # the naive variant pays the glance and the policy, then the whole batch's extension to its largest configuration
    naive_flops = float(np.mean(np.concatenate(
        [classifier.paid_flops([largest_in_batch(p.configs)] * len(p.configs)) for p in predictions])))
    # what the adaptive classifier's arithmetic really is (merged extension passes do more than the configurations
    # count), by torch's FLOP counter on an eager twin: the counter cannot see inside a compiled program
    twin = AdaptiveClassifier(model, classifier.artifact, lam=classifier.lam, merge_passes=classifier.merge_passes)
    performed_flops = sum(measure_flops(lambda b=b: twin.predict(b)) for b in batches) / sum(len(b) for b in batches)
    full_flops = flops(c)
    flop_speedup = full_flops / adaptive_flops
    realized = speed["adaptive"] / speed["full"]
    optional = {}  # what only some classifiers have: a glance, merged passes
    if glance is not None:
        # efficiency if every input stopped at the glance and nothing else cost time: the glance's achieved
        # GFLOP/s over the full model's, a ceiling while most inputs stop there
        glance_flops = flops(c, *glance)
        # and what the adaptive classifier launches beyond the glance: its extension passes (``plan_extensions``),
        # each as deep as its deepest input; against the full model's one pass of ``depth`` blocks
        plans = [plan_extensions(p.configs, glance, classifier.merge_passes) for p in predictions]
        optional |= {
            "glance_images_per_s": speed["glance"], "glance_gflops": glance_flops / 1e9,
            "glance_efficiency": speed["glance"] * glance_flops / (speed["full"] * full_flops),
            "extension_passes_per_batch": float(np.mean([len(plan.passes) for plan in plans])),
            "extension_blocks_per_batch": float(np.mean([sum(p.depth for p in plan.passes) for plan in plans])),
            "full_blocks": c.depth,
        }
    optional[f"{other}_images_per_s"] = speed[other]
    return {
        "batch_size": batch_size,
        "images": sum(len(b) for b in batches),
        "full_images_per_s": speed["full"],
        "adaptive_images_per_s": speed["adaptive"],
        "naive_images_per_s": speed["naive"],
        "full_gflops": full_flops / 1e9,
        "adaptive_gflops": adaptive_flops / 1e9,
        "adaptive_performed_gflops": performed_flops / 1e9,
        "naive_gflops": naive_flops / 1e9,
        "flop_speedup": flop_speedup,
        "realized_speedup": realized,
        "efficiency": realized / flop_speedup,
        "full_gflop_per_s": speed["full"] * full_flops / 1e9,
        "adaptive_gflop_per_s": speed["adaptive"] * adaptive_flops / 1e9,
        **optional,
        "rounds": rounds,
    }


def matmul_peak(device: torch.device | str = "cpu", sizes: tuple[int, ...] = (256, 512, 1024, 2048),
                seconds: float = 0.3) -> dict:
    """Measured float32 ``torch.matmul`` throughput (GFLOP/s) of square products, the best size taken.

    The reference for every path's achieved GFLOP/s: what this machine, with these threads, reaches
    on large dense matrix products, the kind of work the FLOP count counts.
    """
    device = torch.device(device)
    by_size = {}
    with torch.inference_mode():
        for n in sizes:
            a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
            a @ b
            sync(device)
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                done += 1
                if device.type == "cuda" and done % 16:
                    continue
                sync(device)
            sync(device)
            by_size[n] = 2 * n**3 * done / (time.perf_counter() - start) / 1e9
    best = max(by_size, key=by_size.get)
    return {"gflop_per_s": by_size[best], "size": best, "by_size": {str(n): g for n, g in by_size.items()}}


def _percentiles(ms: list[float]) -> dict:
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)} | {"mean": float(np.mean(ms))}


def image_by_image(variants: dict[str, Callable[[torch.Tensor], object]], images: torch.Tensor, rounds: int,
                   warmup: int, progress: bool = False) -> dict[str, list[dict]]:
    """Per variant, per round, the ms percentiles of calling it on each of ``images`` alone (batch 1).

    Each variant is called once untimed first (compiling paths build on first use); then ``rounds`` rounds,
    each variant in turn within a round, so a slow spell of the machine falls on every variant alike.
    """
    device = images.device
    per_round: dict[str, list[dict]] = {name: [] for name in variants}
    steps = [(r, name) for r in range(rounds) for name in variants]
    with torch.inference_mode():
        for fn in variants.values():
            fn(images[:1])
        for _, name in tqdm(steps, desc="batch 1 latency: rounds x variants", disable=not progress):
            fn = variants[name]
            for i in range(warmup):
                fn(images[i % len(images)][None])
            ms = []
            for i in range(len(images)):
                sync(device)
                start = time.perf_counter()
                fn(images[i : i + 1])
                sync(device)
                ms.append(1e3 * (time.perf_counter() - start))
            per_round[name].append(_percentiles(ms))
    return per_round


def latency_across_paths(classifiers: dict[str, AdaptiveClassifier], images: torch.Tensor, rounds: int = 5,
                         warmup: int = 3, progress: bool = False) -> dict:
    """Batch-1 latency of the full model, the adaptive classifier and its glance (with the policy) on each path,
    all in the same interleaved rounds, and per path the realized over the FLOP speed-up.

    ``classifiers`` maps a path name to a classifier of the same backbone and policy on that path. A variant's
    ms are the medians over rounds of its mean and p50 over ``images``.
    """
    first = next(iter(classifiers.values()))
    model = first.backbone
    images = images.to(next(model.parameters()).device)
    full = GridPoint(*model.resolve(None, None, None))
    adaptive_flops = float(np.mean(first.predict_batched(images).flops))
    variants: dict[str, Callable[[torch.Tensor], object]] = {}
    for path, classifier in classifiers.items():
        with torch.inference_mode():  # untimed: every program this path will run, built
            for i in range(len(images)):
                classifier.predict(images[i : i + 1])
        variants |= {f"{path} full": lambda x, c=classifier: c.forward_config(x, full),
                     f"{path} adaptive": classifier.predict, f"{path} glance": classifier.choose}
    per_round = image_by_image(variants, images, rounds, warmup, progress)
    ms = {name: {key: float(np.median([s[key] for s in stats])) for key in ("mean", "p50")}
          for name, stats in per_round.items()}
    full_flops = float(flops(model.config))
    paths = {}
    for path in classifiers:
        realized = ms[f"{path} full"]["mean"] / ms[f"{path} adaptive"]["mean"]
        paths[path] = {"full_ms": ms[f"{path} full"], "adaptive_ms": ms[f"{path} adaptive"],
                       "glance_ms": ms[f"{path} glance"], "realized_speedup": realized,
                       "flop_speedup": full_flops / adaptive_flops,
                       "efficiency": realized / (full_flops / adaptive_flops)}
    return {"images": len(images), "rounds": rounds, "full_gflops": full_flops / 1e9,
            "adaptive_gflops": adaptive_flops / 1e9, "paths": paths}


def format_paths(result: dict) -> str:
    """A markdown table of ``latency_across_paths``: one row per path."""
    header = ("| path (batch 1) | full mean ms | adaptive mean ms | glance + policy mean ms | FLOP speedup | "
              "realized speedup | realized / FLOP |")
    lines = [header, "| --- |" + " ---: |" * 6]
    for path, r in result["paths"].items():
        lines.append(f"| {path} | {r['full_ms']['mean']:.3f} | {r['adaptive_ms']['mean']:.3f} | "
                     f"{r['glance_ms']['mean']:.3f} | {r['flop_speedup']:.2f} | {r['realized_speedup']:.2f} | "
                     f"{r['efficiency']:.2f} |")
    return "\n".join(lines)


def latency_batch1(classifier: AdaptiveClassifier, images: torch.Tensor, rounds: int = 5, warmup: int = 3,
                   progress: bool = False) -> dict:
    """Per-image latency (ms) at batch 1 of the full model, the adaptive classifier and each configuration the
    policy uses (a fresh pass), timed image by image over ``images``, interleaved over ``rounds`` rounds.

    Each variant's p50, p90, p99 and mean are medians over the rounds; its GFLOP/s is its mean FLOPs per image
    over its mean time per image.
    """
    model = classifier.backbone
    c = model.config
    device = next(model.parameters()).device
    images = images.to(device)
    prediction = classifier.predict_batched(images)
    names = {cfg: "config " + GridPoint(*cfg).name for cfg in set(prediction.configs)}
    share = {"full": 1.0, "adaptive": 1.0}
    full = GridPoint(*model.resolve(None, None, None))
    variants: dict[str, Callable[[torch.Tensor], object]] = {
        "full": lambda x: classifier.forward_config(x, full), "adaptive": classifier.predict}
    variant_flops = {"full": float(flops(c)), "adaptive": float(np.mean(prediction.flops))}
    for cfg in sorted(names, key=lambda cfg: flops(c, *cfg)):
        variants[names[cfg]] = lambda x, cfg=cfg: classifier.forward_config(x, cfg)
        variant_flops[names[cfg]] = float(flops(c, *cfg))
        share[names[cfg]] = prediction.configs.count(cfg) / len(prediction.configs)
    with torch.inference_mode():  # untimed: the compiled paths compile each function on first use
        for i in range(len(images)):
            classifier.predict(images[i : i + 1])
    per_round = image_by_image(variants, images, rounds, warmup, progress)
    out = {}
    for name, stats in per_round.items():
        summary = {key: float(np.median([s[key] for s in stats])) for key in stats[0]}
        summary["gflops"] = variant_flops[name] / 1e9
        summary["gflop_per_s"] = variant_flops[name] / (summary["mean"] / 1e3) / 1e9
        summary["share_of_inputs"] = share[name]
        out[name] = summary
    return {"images": len(images), "rounds": rounds, "variants": out}


OPTIONAL_COLUMNS: tuple[tuple[str, str, Callable[[dict], str]], ...] = (
    ("glance_efficiency", "glance alone: efficiency", lambda r: f"{r['glance_efficiency']:.2f}"),
    ("extension_passes_per_batch", "extension passes / blocks per batch (full: 1 / L)",
     lambda r: f"{r['extension_passes_per_batch']:.1f} / {r['extension_blocks_per_batch']:.1f} (1 / {r['full_blocks']})"),
    ("adaptive_performed_gflops", "adaptive: performed / counted FLOPs",
     lambda r: f"{r['adaptive_performed_gflops'] / r['adaptive_gflops']:.3f}"),
    ("unmerged_images_per_s", "adaptive img/s over one pass per (tokens, width)",
     lambda r: f"{r['adaptive_images_per_s'] / r['unmerged_images_per_s']:.2f}"),
    ("merged_images_per_s", "merged passes' img/s over the adaptive's (one pass per (tokens, width))",
     lambda r: f"{r['merged_images_per_s'] / r['adaptive_images_per_s']:.2f}"),
)
"""``format_table``'s columns shown when every result has their key: (key, header, cell)."""


def format_table(results: list[dict], peak: dict | None = None) -> str:
    """A markdown table of ``benchmark_inference`` results, one row per batch size."""
    header = ["batch", "images", "full img/s", "adaptive img/s", "naive img/s", "FLOP speedup", "realized speedup",
              "efficiency"]
    optional = [column for column in OPTIONAL_COLUMNS if all(column[0] in r for r in results)]
    header += [name for _, name, _ in optional]
    if peak:
        header += ["full: share of matmul peak", "adaptive: share of matmul peak"]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for r in results:
        row = (f"| {r['batch_size']} | {r['images']} | {r['full_images_per_s']:,.0f} | "
               f"{r['adaptive_images_per_s']:,.0f} | {r['naive_images_per_s']:,.0f} | {r['flop_speedup']:.2f} | "
               f"{r['realized_speedup']:.2f} | {r['efficiency']:.2f} |")
        row += "".join(f" {cell(r)} |" for _, _, cell in optional)
        if peak:
            row += (f" {100 * r['full_gflop_per_s'] / peak['gflop_per_s']:.0f}% |"
                    f" {100 * r['adaptive_gflop_per_s'] / peak['gflop_per_s']:.0f}% |")
        lines.append(row)
    return "\n".join(lines)


def format_latency(latency: dict, peak: dict | None = None) -> str:
    """A markdown table of ``latency_batch1``: one row per variant, ms per image and achieved GFLOP/s."""
    header = ["batch 1", "share of inputs", "MFLOPs/image", "p50 ms", "p90 ms", "p99 ms", "mean ms", "GFLOP/s"]
    if peak:
        header.append("share of matmul peak")
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, v in latency["variants"].items():
        row = (f"| {name} | {100 * v['share_of_inputs']:.1f}% | {1e3 * v['gflops']:.2f} | {v['p50']:.2f} | "
               f"{v['p90']:.2f} | {v['p99']:.2f} | {v['mean']:.2f} | {v['gflop_per_s']:.1f} |")
        if peak:
            row += f" {100 * v['gflop_per_s'] / peak['gflop_per_s']:.1f}% |"
        lines.append(row)
    return "\n".join(lines)
