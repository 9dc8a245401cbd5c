"""Speed at the paper's scale, where compute and not per-call overhead sets the time.

A backbone of the paper's size with random weights (timing needs no trained weights) and an untrained policy
network (its cost is paid, its choices are not used) serve three measurements:

- ``config_speed``: images/s (and so ms per batch) of fresh passes at chosen configurations and one batch size;
- ``mix_speed``: the adaptive classifier answering a fixed mix of configurations (an assignment of configurations
  to inputs, ``Mix``) through the same glance, plan and extension passes as ``AdaptiveClassifier.predict``
  (``predict_assigned``), against the full model on the same path, interleaved over rounds;
- ``tabulation_speed`` and ``ppo_speed``: building outcome tables, and PPO over a memory-mapped synthetic table of
  millions of rows (``synthetic_table``); ``merge_memory``: the memory of merging torchrun's table shards.

Every timing goes through a ``timer`` (default ``two_clocks``: the wall clock and the process's CPU time of the same
pass), so a test can give known times and check that each reported ratio is computed from them.
"""

from __future__ import annotations

import resource
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import torch
from stable_baselines3 import PPO
from tqdm import tqdm

from backbone import AdaPerceiver, AdaPerceiverConfig, flops, flops_grid
from backbone.config import ConfigError
from backbone.grid import GridPoint
from envs import FeatureSpec, OutcomeTable, TableVecEnv, build_outcome_table, load_table, save_table
from envs.features import staged_flops
from envs.outcome_table import PER_INPUT, save_concatenated
from evaluation.benchmark import batches_of, sync
from inference.classifier import AdaptiveClassifier
from policy.artifact import PolicyArtifact, make_policy
from policy.train import PolicyTrainConfig

Timer = Callable[[Callable[[torch.Tensor], object], list[torch.Tensor]], dict[str, float]]
"""Images/s of ``fn(batch)`` over ``batches``, by clock: ``{"wall": ..., "cpu": ...}`` (``two_clocks``)."""


def two_clocks(fn: Callable[[torch.Tensor], object], batches: list[torch.Tensor], warmup: int = 0) -> dict[str, float]:
    """Images/s of one pass of ``fn`` over ``batches`` by the wall clock and, on a CPU, by this process's CPU time.

    The CPU time leaves out the time the operating system gave other processes, so on a shared machine it is the
    figure load moves less (cache and memory-bandwidth contention still count). On a GPU only the wall clock means
    anything. One pass, not ``images_per_second``'s repeated ones: at this size one batch takes seconds.
    """
    device = batches[0].device
    for i in range(warmup):
        fn(batches[i % len(batches)])
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        fn(batch)
    sync(device)
    n = sum(len(b) for b in batches)
    out = {"wall": n / (time.perf_counter() - wall)}
    if device.type == "cpu":
        out["cpu"] = n / max(time.process_time() - cpu, 1e-9)
    return out


def random_classifier(config: AdaPerceiverConfig, path: str = "eager", seed: int = 0, device: str | torch.device = "cpu",
                      net_arch: Sequence[int] = (128, 128)) -> AdaptiveClassifier:
    """An adaptive classifier of random weights at ``config``'s grid on ``device``: the backbone (``seed``) and a
    policy network of the project's default size on the default glance features, untrained (timing only)."""
    torch.manual_seed(seed)
    backbone = AdaPerceiver(config).eval().to(device)
    spec = FeatureSpec()
    n_features = spec.dim(config)
    policy = make_policy(n_features, list(config.grid_shape), list(net_arch))
    meta = {**config.grid_axes(), "features": spec.to_dict(), "net_arch": list(net_arch), "lam": 0.0,
            "backbone_hash": None}
    artifact = PolicyArtifact(policy, np.zeros(n_features, np.float32), np.ones(n_features, np.float32), meta)
    return AdaptiveClassifier(backbone, artifact, path=path)


def map_point(point: GridPoint, source: AdaPerceiverConfig, target: AdaPerceiverConfig) -> GridPoint:
    """The point of ``target``'s grid at the same relative position as ``point`` on ``source``'s, axis by axis.

    Index ``i`` of an axis of ``n`` values goes to ``round(i * (m - 1) / (n - 1))`` of ``m``: the smallest stays the
    smallest (the glance stays the glance), the largest the largest (the full configuration stays full).
    """
    def place(i: int, n: int, m: int) -> int:
        return 0 if n == 1 else round(i * (m - 1) / (n - 1))

    k, l, w = GridPoint(*point).action(source.token_grans, source.ffn_widths)
    action = (place(k, len(source.token_grans), len(target.token_grans)), place(l, source.depth, target.depth),
              place(w, len(source.ffn_widths), len(target.ffn_widths)))
    return GridPoint.from_action(action, target.token_grans, target.ffn_widths)


@dataclass(frozen=True)
class Mix:
    """A share of inputs per configuration: what a policy chose, as a fixed assignment to time."""

    name: str
    shares: dict[GridPoint, float]
    """Configuration -> share of inputs; the shares sum to 1."""
    source: str
    """Where the shares come from (a policy and its data, mapped onto this grid)."""

    @classmethod
    def of(cls, name: str, configs: Sequence[GridPoint], source: str) -> Mix:
        """The mix of a list of per-input configurations."""
        counts = Counter(GridPoint(*c) for c in configs)
        return cls(name, {c: counts[c] / len(configs) for c in sorted(counts)}, source)

    def mapped(self, source: AdaPerceiverConfig, target: AdaPerceiverConfig) -> Mix:
        """This mix on ``target``'s grid (``map_point``; points that map to the same one add up)."""
        shares: dict[GridPoint, float] = {}
        for point, share in self.shares.items():
            moved = map_point(point, source, target)
            shares[moved] = shares.get(moved, 0.0) + share
        return Mix(self.name, dict(sorted(shares.items())), self.source)

    def assign(self, n: int, seed: int = 0) -> list[GridPoint]:
        """A configuration for each of ``n`` inputs with these shares (largest remainders), in a seeded order."""
        points = list(self.shares)
        exact = np.array([self.shares[p] for p in points]) * n
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
            counts[i] += 1
        assigned = [p for p, count in zip(points, counts, strict=True) for _ in range(count)]
        return [assigned[i] for i in np.random.default_rng(seed).permutation(n)]

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source,
                "shares": [{"config": list(p), "share": s} for p, s in self.shares.items()]}


def _interleaved(variants: dict[str, Callable], batches: list[torch.Tensor], rounds: int, timer: Timer,
                 desc: str, progress: bool) -> dict[str, dict[str, list[float]]]:
    """Images/s ``[clock][variant]`` in each of ``rounds`` rounds, each round timing every variant once in turn."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    measured: dict[str, dict[str, list[float]]] = {}
    steps = [(r, name) for r in range(rounds) for name in variants]
    with torch.inference_mode():
        for _, name in tqdm(steps, desc=desc, disable=not progress):
            for clock, value in timer(variants[name], batches).items():
                measured.setdefault(clock, {n: [] for n in variants})[name].append(float(value))
    return measured


def config_speed(classifier: AdaptiveClassifier, images: torch.Tensor, configs: Sequence[GridPoint], batch_size: int,
                 rounds: int = 1, timer: Timer | None = None, progress: bool = False) -> list[dict]:
    """Fresh passes at each of ``configs`` on ``images`` ``(N, C, H, W)`` in batches of ``batch_size``, on the
    classifier's path, interleaved over ``rounds``: per configuration images/s, ms per batch, GFLOPs per image and
    achieved GFLOP/s (the compiling paths build each program before any timing)."""
    timer = timer or two_clocks
    c = classifier.backbone.config
    batches = batches_of(images, batch_size)
    points = [GridPoint(*classifier.backbone.resolve(*p)) for p in configs]
    variants = {p.name: (lambda x, p=p: classifier.forward_config(x, p)) for p in points}
    if classifier.path != "eager":  # untimed: builds each program (at this size eager needs no warm-up pass)
        with torch.inference_mode():
            for fn in variants.values():
                fn(batches[0])
    measured = _interleaved(variants, batches, rounds, timer, f"batch {batch_size}: rounds x configurations", progress)
    out = []
    for p in points:
        gflops = flops(c, *p) / 1e9
        row = {"config": list(p), "batch_size": len(batches[0]), "gflops": gflops}
        for clock, speeds in measured.items():
            ips = float(np.median(speeds[p.name]))
            prefix = "" if clock == "wall" else f"{clock}_"
            row |= {f"{prefix}images_per_s": ips, f"{prefix}ms_per_batch": 1e3 * len(batches[0]) / ips,
                    f"{prefix}gflop_per_s": ips * gflops}
        out.append(row)
    return out


def mix_speed(classifier: AdaptiveClassifier, images: torch.Tensor, mixes: Sequence[Mix], batch_size: int,
              rounds: int = 3, timer: Timer | None = None, seed: int = 0, progress: bool = False) -> dict:
    """The adaptive classifier answering each mix (``predict_assigned``: glance, policy network, plan, extension
    passes) against the full model on the same path, on the same batches of ``images`` ``(N, C, H, W)``,
    interleaved over ``rounds`` rounds; each speed is its median round.

    Per mix: images/s, FLOPs per image as paid (glance, extension, policy network), the FLOP speed-up over the full
    model, the realized speed-up (its images/s over the full model's) and their ratio, ``efficiency``.
    """
    timer = timer or two_clocks
    model = classifier.backbone
    full = GridPoint(*model.resolve(None, None, None))
    batches = batches_of(images, batch_size)
    n = sum(len(b) for b in batches)
    variants: dict[str, Callable] = {"full": lambda x: classifier.forward_config(x, full)}
    assigned = {}
    for mix in mixes:
        configs = mix.assign(n, seed)
        assigned[mix.name] = configs
        # each batch keeps its own rows' configurations, whichever order the timer calls the batches in
        per_batch, start = {}, 0
        for batch in batches:
            per_batch[id(batch)] = configs[start : start + len(batch)]
            start += len(batch)
        variants[mix.name] = lambda x, per_batch=per_batch: classifier.predict_assigned(x, per_batch[id(x)])
    if classifier.path != "eager":  # untimed: every program a compiling path needs is built here
        with torch.inference_mode():
            for fn in variants.values():
                for batch in batches:
                    fn(batch)
    compile_s = classifier.compile_seconds
    measured = _interleaved(variants, batches, rounds, timer, f"batch {batch_size}: rounds x variants", progress)
    full_flops = float(flops(model.config))
    mix_flops = {}
    for mix in mixes:
        paid = float(np.mean(classifier.paid_flops(assigned[mix.name])))
        mix_flops[mix.name] = {"gflops": paid / 1e9, "flop_speedup": full_flops / paid,
                               "glance_share": assigned[mix.name].count(classifier.glance_point) / n}
    clocks = {}
    for clock, by_variant in measured.items():
        full_ips = float(np.median(by_variant["full"]))
        results = {}
        for mix in mixes:
            ips, flop_speedup = float(np.median(by_variant[mix.name])), mix_flops[mix.name]["flop_speedup"]
            realized = ips / full_ips
            # each round's own ratio (the mix against the full model timed just before it): the spread load causes
            per_round = [a / f / flop_speedup for a, f in zip(by_variant[mix.name], by_variant["full"], strict=True)]
            results[mix.name] = {"images_per_s": ips, "realized_speedup": realized, "efficiency": realized / flop_speedup,
                                 "efficiency_by_round": per_round, "images_per_s_by_round": by_variant[mix.name]}
        clocks[clock] = {"full_images_per_s": full_ips, "full_images_per_s_by_round": by_variant["full"],
                         "mixes": results}
    return {"batch_size": len(batches[0]), "images": n, "rounds": rounds, "full_gflops": full_flops / 1e9,
            "compile_s": compile_s, "mix_flops": mix_flops, "clocks": clocks}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (``ru_maxrss``: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> dict[str, float]:
    """This process's resident memory now, MiB: anonymous (its own arrays) and file-backed (mapped file pages,
    which the kernel can drop and read again)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return {"anon": fields.get("RssAnon", float("nan")), "file": fields.get("RssFile", float("nan"))}


def tabulation_speed(model: AdaPerceiver, images: torch.Tensor, batch_size: int, spec: FeatureSpec | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict:
    """Images/s of ``build_outcome_table`` (one grid pass per width, every configuration's outcome) over ``images``,
    random labels, one untimed batch first."""
    spec = spec or FeatureSpec()
    labels = torch.randint(model.config.num_classes, (len(images),), generator=torch.Generator().manual_seed(0))
    build_outcome_table(model, images[:batch_size], labels[:batch_size], spec, batch_size)  # warm-up
    start = clock()
    table = build_outcome_table(model, images, labels, spec, batch_size)
    seconds = clock() - start
    return {"images": len(images), "batch_size": batch_size, "seconds": seconds, "images_per_s": len(images) / seconds,
            "configurations": int(np.prod(model.config.grid_shape)), "bytes_per_row": table_bytes_per_row(table),
            "peak_rss_mib": peak_rss_mib()}


def table_bytes_per_row(table: OutcomeTable) -> int:
    """Bytes one input takes in an outcome table: its per-input arrays at their stored dtypes."""
    return int(sum(getattr(table, key)[:1].nbytes for key in PER_INPUT))


def synthetic_table(path: str | Path, config: AdaPerceiverConfig, rows: int, spec: FeatureSpec | None = None,
                    seed: int = 0, chunk: int = 16_384, progress: bool = False) -> Path:
    """Write an outcome table of ``rows`` synthetic inputs on ``config``'s grid to ``path`` (``save_table``'s
    format and dtypes), never holding it in memory: the arrays are filled chunk by chunk into memory-mapped files
    beside ``path`` (removed afterwards), then saved.

    Outcomes: each input's class, and a difficulty that sets the configurations (by FLOPs) it is right at; features
    are standardized noise. For timing and memory only.
    """
    spec, path = spec or FeatureSpec(), Path(path)
    grid, c = config.grid_shape, config
    full_flops = float(flops(c))
    rank = staged_flops(spec, c) / full_flops  # (K, L, M), the glance's near 0, the full configuration's near 1
    n_features = spec.dim(c)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        def array(name: str, shape: tuple, dtype) -> np.memmap:
            return np.lib.format.open_memmap(Path(scratch) / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

        arrays = {"features": array("features", (rows, n_features), np.float32),
                  "predicted": array("predicted", (rows, *grid), np.int16),
                  "true_logprob": array("true_logprob", (rows, *grid), np.float32),
                  "confidence": array("confidence", (rows, *grid), np.float32),
                  "labels": array("labels", (rows,), np.int64)}
        for start in tqdm(range(0, rows, chunk), desc="synthetic table", unit="chunk", disable=not progress):
            n = min(chunk, rows - start)
            labels = rng.integers(c.num_classes, size=n)
            right = rank[None] >= rng.random(n)[:, None, None, None] ** 3  # harder inputs need larger configurations
            wrong = (labels + 1 + rng.integers(c.num_classes - 1, size=n)) % c.num_classes
            arrays["labels"][start : start + n] = labels
            arrays["predicted"][start : start + n] = np.where(right, labels[:, None, None, None], wrong[:, None, None, None])
            arrays["true_logprob"][start : start + n] = np.where(right, -0.1, -3.0).astype(np.float32)
            arrays["confidence"][start : start + n] = np.where(right, 0.9, 0.3).astype(np.float32)
            arrays["features"][start : start + n] = rng.standard_normal((n, n_features), dtype=np.float32)
        table = OutcomeTable(**arrays, flops=flops_grid(c).numpy(), staged_flops=staged_flops(spec, c),
                             token_grans=c.token_grans, ffn_widths=c.ffn_widths, meta={"synthetic": True, "rows": rows})
        save_table(table, path)
        del table, arrays
    return path


class AnonPeak:
    """The peak of this process's anonymous resident memory while the block runs, sampled every ``interval`` s (MiB,
    ``peak`` and the ``growth`` over its value on entry). File-backed pages, such as a memory-mapped table's, are left
    out: the kernel can drop and read them again."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.growth = interval, float("nan"), float("nan")

    def __enter__(self) -> Self:
        self._start = self.peak = rss_mib()["anon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mib()["anon"])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib()["anon"])
        self.growth = self.peak - self._start


def merge_memory(config: AdaPerceiverConfig, rows: int, shards: int, scratch: str | Path, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time and peak anonymous memory of merging ``shards`` synthetic table shards of ``rows`` rows in all into one
    file, as the main rank does under torchrun (``save_concatenated`` over the shards memory-mapped; each shard is
    verified against its digest first, as ``load_table`` does)."""
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        parts = [synthetic_table(Path(folder) / f"shard{i}.npz", config, len(r), seed=seed + i)
                 for i, r in enumerate(np.array_split(np.arange(rows), shards))]
        merged = Path(folder) / "merged.npz"
        with AnonPeak() as memory:
            start = clock()
            save_concatenated([load_table(part, mmap=True) for part in parts], merged)
            seconds = clock() - start
        return {"rows": rows, "shards": shards, "table_bytes": merged.stat().st_size, "seconds": seconds,
                "anon_peak_growth_mib": memory.growth}


def ppo_speed(table_path: str | Path, timesteps: int, config: PolicyTrainConfig | None = None,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """PPO steps/s and memory over the table at ``table_path``, memory-mapped: stable-baselines3's PPO with the
    project's hyperparameters (``PolicyTrainConfig``: envs, steps, batch, epochs, network, reward, price range) on
    ``TableVecEnv``, for ``timesteps`` env steps after one untimed rollout.

    The table's features are used as stored (the synthetic table's are standardized already): ``policy.train``'s
    ``train_one`` would first write a standardized copy of them in memory, which this does not measure.
    """
    config = config or PolicyTrainConfig(quiet=True)
    torch.set_num_threads(config.threads)
    before = rss_mib()
    start = clock()
    table = load_table(table_path, mmap=True)
    load_s = clock() - start
    env = TableVecEnv(table, num_envs=config.num_envs, lam=tuple(config.lam_range), seed=config.seed,
                      reward=config.reward)
    ppo = PPO("MlpPolicy", env, n_steps=config.n_steps, batch_size=config.batch_size, n_epochs=config.n_epochs,
              learning_rate=config.learning_rate, gamma=config.gamma, policy_kwargs={"net_arch": list(config.net_arch)},
              seed=config.seed, device="cpu", verbose=0)
    rollout = config.num_envs * config.n_steps
    ppo.learn(rollout)  # untimed: the first rollout builds the env's cached correctness and agreement arrays
    done, start = ppo.num_timesteps, clock()
    ppo.learn(timesteps, reset_num_timesteps=False)
    seconds, steps = clock() - start, ppo.num_timesteps - done
    return {"rows": len(table), "timesteps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "load_and_verify_s": load_s, "table_bytes": Path(table_path).stat().st_size,
            "bytes_per_row": table_bytes_per_row(table), "rss_before_mib": before, "rss_after_mib": rss_mib(),
            "peak_rss_mib": peak_rss_mib(), "num_envs": config.num_envs, "n_steps": config.n_steps,
            "batch_size": config.batch_size, "n_epochs": config.n_epochs, "net_arch": list(config.net_arch),
            "reward": config.reward}


CONFIG_SETS = ("all", "corners", "used")


def select_configs(config: AdaPerceiverConfig, which: str, used: Sequence[GridPoint] = ()) -> list[GridPoint]:
    """The configurations to time: ``"all"`` (the whole grid), ``"corners"`` (the glance, the full configuration, and
    each axis at its smallest with the others at their largest), ``"used"`` (``used`` and the full configuration), or
    a comma-separated list of ``tokens/depth/width`` (``ConfigError`` for a point off the grid), in FLOP order."""
    c = config
    full = GridPoint(c.max_tokens, c.depth, 1.0)
    if which == "all":
        points = [GridPoint.from_action(a, c.token_grans, c.ffn_widths) for a in np.ndindex(*c.grid_shape)]
    elif which == "corners":
        glance = GridPoint(*FeatureSpec().glance_config(c))
        points = [glance, GridPoint(c.token_grans[0], c.depth, 1.0), GridPoint(c.max_tokens, 1, 1.0),
                  GridPoint(c.max_tokens, c.depth, c.ffn_widths[0]), full]
    elif which == "used":
        points = [*used, full]
    else:
        points = []
        for item in which.split(","):
            parts = item.strip().split("/")
            if len(parts) != 3:
                raise ConfigError(f"configuration {item!r} is not tokens/depth/width (e.g. 256/21/1); or use one of "
                                  f"{', '.join(CONFIG_SETS)}")
            points.append(GridPoint(int(parts[0]), int(parts[1]), float(parts[2])))
    for p in points:
        c.token_index(p.tokens), c.check_depth(p.depth), c.width_index(p.width)
    return sorted(set(points), key=lambda p: (flops(c, *p), p))


def policy_mixes(classifier: AdaptiveClassifier, images: torch.Tensor, target: AdaPerceiverConfig,
                 tolerance: float | None, source: str) -> list[Mix]:
    """The mixes a trained policy chooses on ``images``, mapped onto ``target``'s grid (``Mix.mapped``): at its
    calibrated price, and at the price its operating points certify at ``tolerance`` (a disagreement in %)."""
    lam = classifier.artifact.meta["lam"] if classifier.lam is None else classifier.lam
    mixes = [Mix.of("policy", classifier.predict_batched(images).configs, f"{source}, calibrated price {lam:.4g}")]
    if tolerance is not None:
        certified = AdaptiveClassifier(classifier.backbone, classifier.artifact, tolerance=tolerance)
        mixes.append(Mix.of(f"certified {tolerance:g}%", certified.predict_batched(images).configs,
                            f"{source}, price {certified.lam:.4g} certified at {tolerance:g}% disagreement"))
    return [mix.mapped(classifier.backbone.config, target) for mix in mixes]


def format_configs(rows: list[dict], peak: dict | None = None) -> str:
    """A markdown table of ``config_speed`` rows (wall clock; CPU time where measured)."""
    cpu = all("cpu_images_per_s" in r for r in rows)
    header = ["batch", "configuration", "GFLOPs/image", "ms/batch", "images/s", "GFLOP/s"]
    header += ["share of matmul peak"] if peak else []
    header += ["CPU-time ms/batch", "CPU-time GFLOP/s"] if cpu else []
    lines = ["| " + " | ".join(header) + " |", "| ---: | --- |" + " ---: |" * (len(header) - 2)]
    for r in rows:
        line = (f"| {r['batch_size']} | {GridPoint(*r['config']).name} | {r['gflops']:.2f} | "
                f"{r['ms_per_batch']:,.1f} | {r['images_per_s']:,.2f} | {r['gflop_per_s']:.1f} |")
        if peak:
            line += f" {100 * r['gflop_per_s'] / peak['gflop_per_s']:.0f}% |"
        if cpu:
            line += f" {r['cpu_ms_per_batch']:,.1f} | {r['cpu_gflop_per_s']:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def format_mixes(mixes: Sequence[Mix], results: list[dict], goal: float) -> str:
    """Markdown: each mix's shares, then one row per (clock, batch size, mix) of ``mix_speed`` results."""
    lines = []
    for mix in mixes:
        shares = ", ".join(f"{p.name} {100 * s:.1f}%" for p, s in mix.shares.items())
        lines.append(f"- **{mix.name}** ({mix.source}): {shares}")
    header = ["clock", "batch", "images", "rounds", "mix", "full img/s", "adaptive img/s", "GFLOPs/image (full)",
              "FLOP speed-up", "realized speed-up", f"realized / FLOP (goal >= {goal:g})", "per round"]
    lines += ["", "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * 3 + " --- |" + " ---: |" * (len(header) - 5)]
    for r in results:
        for clock, timed in r["clocks"].items():
            for name, m in timed["mixes"].items():
                fixed = r["mix_flops"][name]
                verdict = "met" if m["efficiency"] >= goal else "not met"
                rounds = ", ".join(f"{e:.2f}" for e in m["efficiency_by_round"])
                lines.append(
                    f"| {clock} | {r['batch_size']} | {r['images']} | {r['rounds']} | {name} | "
                    f"{timed['full_images_per_s']:.3f} | {m['images_per_s']:.3f} | {fixed['gflops']:.2f} "
                    f"({r['full_gflops']:.1f}) | {fixed['flop_speedup']:.2f} | {m['realized_speedup']:.2f} | "
                    f"{m['efficiency']:.3f} ({verdict}) | {rounds} |")
    return "\n".join(lines)
