"""The application's two stages, each batched by Ray Serve across requests, and what travels to and from them.

- ``GlanceStage``: the glance and the policy at each request's price; the glance's answer for the inputs the
  policy keeps there, glance states for the others.
- ``ExtensionStage``: the other inputs' glance states, one homogeneous pass per (tokens, width) of a batch, each
  row leaving at its own depth (``plan_extensions`` without merging: exactly the configurations' arithmetic);
  and batches at the full configuration (the audit, requests with ``"full": true``).
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve
from ray.serve.metrics import Histogram

from backbone.errors import ProjectError
from backbone.grid import GridPoint
from backbone.model import GlanceState
from inference.classifier import AdaptiveClassifier
from inference.plan import plan_extensions
from serving.options import ServeOptions

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass
class GlanceCall:
    images: torch.Tensor
    """``(B, C, H, W)`` float32."""
    lam: float
    entered: float = 0.0
    """``time.perf_counter()`` when the call reached the stage (its queueing starts)."""


@dataclass
class GlanceResult:
    configs: list[GridPoint]
    """Each input's configuration, chosen by the policy."""
    flops: np.ndarray
    """``(B,)`` FLOPs per input as paid."""
    answered: np.ndarray
    """``(B,)`` bool: the glance's answer is the input's."""
    logits: torch.Tensor
    """``(B, C)`` the glance's logits (the answer of the answered rows)."""
    state: GlanceState
    """The glance state of the rows not answered, in batch order."""
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_images: int = 0


@dataclass
class ExtendCall:
    state: GlanceState
    """Glance states of one request's rows that the glance did not answer."""
    configs: list[GridPoint]
    """Each row's configuration."""
    entered: float = 0.0


@dataclass
class FullCall:
    images: torch.Tensor
    entered: float = 0.0


@dataclass
class StageResult:
    logits: torch.Tensor
    """``(n, C)``."""
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_images: int = 0
    looked_again: np.ndarray | None = None
    """``(n,)`` bool: rows the second look extended on to the full configuration (None: no second look ran)."""
    second_look_flops: float = 0.0
    """FLOPs each of those rows paid for it, on top of its configuration's."""


def _images_in(calls) -> int:
    """Ray Serve's batch size of a list of calls: their images (or glance rows)."""
    return sum(len(c.images) if hasattr(c, "images") else len(c.state.read_kv[0]) for c in calls)


def _load(options: ServeOptions) -> AdaptiveClassifier:
    torch.set_num_threads(options.threads)
    return AdaptiveClassifier.from_dirs(options.backbone, options.policy)


def _batch_metric(stage: str) -> tuple[Histogram, dict]:
    histogram = Histogram("adaperceiver_batch_images", description="Images per batch a stage ran",
                          boundaries=BATCH_BOUNDARIES, tag_keys=("stage",))
    return histogram, {"stage": stage}


@serve.deployment
class GlanceStage:
    """The glance and the policy, batched across requests (one program call per price in a batch)."""

    def __init__(self, options: ServeOptions) -> None:
        self.classifier = _load(options)
        self.glance_point = self.classifier.glance_point
        if self.glance_point is None:
            raise ProjectError(f"{options.policy} has no glance; the serving stages continue from one: train a "
                               "policy with a glance (the default feature spec)")
        self.batch.set_max_batch_size(options.max_batch_size)
        self.batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)
        self.batch_images, self.tags = _batch_metric("glance")

    async def __call__(self, call: GlanceCall) -> GlanceResult:
        call.entered = time.perf_counter()
        return await self.batch(call)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def batch(self, calls: list[GlanceCall]) -> list[GlanceResult]:
        start = time.perf_counter()
        results: list[GlanceResult | None] = [None] * len(calls)
        by_price: dict[float, list[int]] = {}
        for i, call in enumerate(calls):
            by_price.setdefault(call.lam, []).append(i)
        for lam, members in by_price.items():
            choice = self.classifier.with_price(lam).choose(torch.cat([calls[i].images for i in members]))
            glance, offset = choice.glance, 0
            for i in members:
                rows = slice(offset, offset + len(calls[i].images))
                offset = rows.stop
                configs = choice.configs[rows]
                answered = np.array([c == self.glance_point for c in configs])
                keep = torch.from_numpy(np.flatnonzero(~answered) + rows.start)  # indexing copies: no shared storage
                state = GlanceState(glance.state.config, [t[keep] for t in glance.state.latents],
                                    tuple(t[keep] for t in glance.state.read_kv))
                results[i] = GlanceResult(configs, choice.flops[rows], answered, glance.logits[rows].float().clone(),
                                          state)
        compute_ms, images = 1000 * (time.perf_counter() - start), _images_in(calls)
        self.batch_images.observe(images, tags=self.tags)
        for call, result in zip(calls, results, strict=True):
            result.queue_ms, result.compute_ms, result.batch_images = 1000 * (start - call.entered), compute_ms, images
        return results


@serve.deployment
class ExtensionStage:
    """Extensions from the glance, batched across requests by Ray Serve; each batch runs one homogeneous pass per
    (tokens, width) of its rows, each row leaving at its own depth (``plan_extensions`` without merging: exactly
    the configurations' arithmetic)."""

    def __init__(self, options: ServeOptions) -> None:
        self.classifier = _load(options)
        c = self.classifier.backbone.config
        self.full_config = GridPoint(c.token_grans[-1], c.depth, c.ffn_widths[-1])
        for batch in (self.extend_batch, self.full_batch):
            batch.set_max_batch_size(options.max_batch_size)
            batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)
        self.batch_images, self.tags = _batch_metric("extension")
        self.full_tags = {"stage": "full"}
        self.passes = Histogram("adaperceiver_extension_passes", description="Extension passes per batch",
                                boundaries=BATCH_BOUNDARIES, tag_keys=("stage",))

    async def __call__(self, call: ExtendCall) -> StageResult:
        call.entered = time.perf_counter()
        return await self.extend_batch(call)

    async def full(self, call: FullCall) -> StageResult:
        call.entered = time.perf_counter()
        return await self.full_batch(call)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def extend_batch(self, calls: list[ExtendCall]) -> list[StageResult]:
        start = time.perf_counter()
        states = [c.state for c in calls]
        state = GlanceState(states[0].config, [torch.cat(t) for t in zip(*(s.latents for s in states), strict=True)],
                            tuple(torch.cat(t) for t in zip(*(s.read_kv for s in states), strict=True)))
        configs = [config for c in calls for config in c.configs]
        logits = torch.empty(len(configs), self.classifier.backbone.config.num_classes)
        plan = plan_extensions(configs, state.config)
        with torch.inference_mode():
            for extension in plan.passes:  # each pass returns its rows by exit depth
                logits[torch.tensor(extension.rows)] = self.classifier.runner.extend(state, extension).float()
            logits, again = self.classifier.look_again(state, configs, logits)  # as predict runs it
        self.passes.observe(len(plan.passes) + int(again.any()), tags=self.tags)
        results = self._split(calls, logits, [len(s.read_kv[0]) for s in states], start, self.tags)
        if self.classifier.second_look is not None:
            for result, part in zip(results, np.split(again, np.cumsum([len(c.configs) for c in calls])[:-1]),
                                    strict=True):
                result.looked_again, result.second_look_flops = part, self.classifier.second_look_flops
        return results

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def full_batch(self, calls: list[FullCall]) -> list[StageResult]:
        start = time.perf_counter()
        logits = self.classifier.forward_config(torch.cat([c.images for c in calls]), self.full_config).float()
        return self._split(calls, logits, [len(c.images) for c in calls], start, self.full_tags)

    def _split(self, calls, logits: torch.Tensor, sizes: list[int], start: float, tags: dict) -> list[StageResult]:
        compute_ms = 1000 * (time.perf_counter() - start)
        self.batch_images.observe(sum(sizes), tags=tags)
        parts = torch.split(logits, sizes)
        return [StageResult(part.clone(), 1000 * (start - call.entered), compute_ms, sum(sizes))
                for call, part in zip(calls, parts, strict=True)]


# (helpers the deployments call stand above them: a replica built from the ingress wrapper found a helper
# defined below the class missing)
