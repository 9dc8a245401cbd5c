"""Adaptive inference: glance -> features -> policy -> each input answered by the glance or extended to its configuration."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from backbone import AdaPerceiver, flops
from backbone.checkpoint import backbone_hash, load_checkpoint
from backbone.compiled import COMPILING_PATHS, check_inference_path, for_path
from backbone.grid import GridPoint
from backbone.model import GlanceState, ImageError
from envs import features_from, staged_flops
from policy.artifact import PolicyArtifact, PolicyArtifactError, check_backbone_hash, load_policy
from policy.selection import certified_point, points_of


@dataclass
class Prediction:
    """What the adaptive classifier says about a batch, in input order."""

    logits: torch.Tensor
    """``(B, C)`` float32, in input order."""
    classes: torch.Tensor
    """``(B,)`` int64 predicted classes."""
    confidence: torch.Tensor
    """``(B,)`` max softmax probability."""
    configs: list[GridPoint]
    """``(tokens, depth, width)`` each input ran at."""
    flops: np.ndarray
    """``(B,)`` float64 FLOPs per input as paid: the glance, its extension to the input's configuration (none
    when the glance answers) and the policy network."""

    @classmethod
    def cat(cls, parts: list[Prediction]) -> Prediction:
        """One prediction from consecutive batches' predictions (order kept)."""
        return cls(torch.cat([p.logits for p in parts]), torch.cat([p.classes for p in parts]),
                   torch.cat([p.confidence for p in parts]), [c for p in parts for c in p.configs],
                   np.concatenate([p.flops for p in parts]))


class AdaptiveClassifier:
    """A frozen backbone with a policy that picks each input's configuration."""

    def __init__(self, backbone: AdaPerceiver, artifact: PolicyArtifact, backbone_hash: str | None = None,
                 lam: float | None = None, path: str = "eager", merge_passes: bool = False,
                 tolerance: float | None = None) -> None:
        """Check the policy's action grid is the backbone's and, given ``backbone_hash``, that it was made for it.

        ``lam`` sets the FLOP price of a price-conditioned policy (default: its calibrated price). ``tolerance``
        (a disagreement with the full model, in %) sets it instead to the cheapest price the artifact's operating
        points certify at that tolerance (``experiments/calibrate.py`` writes them); a tolerance nothing certifies
        is refused with a ``NothingCertifiedError`` that says what would be. ``path`` is the
        inference path (``backbone.compiled``): ``"eager"``, ``"compiled"`` (torch.compile), ``"aot"``
        (AOTInductor) or ``"graphs"`` (CUDA graphs, on a GPU); the compiled paths compile each configuration on
        its first use (seconds each), the graphs path records each configuration and input shapes on their first
        use (milliseconds), and all give the same logits within float noise. The policy network moves to the
        backbone's device. ``merge_passes`` (off by default): extend inputs of several configurations in one pass
        where ``extension_passes`` says so: fewer, larger operator calls, but 3-6% more arithmetic than the
        configurations' FLOPs that ``Prediction.flops`` reports (the benchmark measures both). Off, one pass per
        (tokens, width), whose arithmetic is exactly what ``predict`` reports (a test counts it with torch).
        """
        c = backbone.config
        for key, value in c.grid_axes().items():
            found = artifact.meta.get(key)
            if found is None or [float(v) for v in found] != [float(v) for v in value]:
                raise PolicyArtifactError(f"policy {key} {found} do not match the backbone's {value}; "
                                 "train a policy for this backbone with experiments/train_policy.py")
        check_backbone_hash(artifact.meta, backbone_hash, "the policy")
        self.backbone = backbone.eval()
        if tolerance is not None:
            if lam is not None:
                raise ValueError("give a price (lam) or a tolerance, not both")
            lam = certified_point(points_of(artifact.meta), tolerance).lam
        self.artifact, self.lam, self.spec = artifact, lam, artifact.feature_spec
        self._lam_column = artifact.lam_column(lam)
        # the glance's configuration, None for a policy without a glance
        self.glance_point = GridPoint(*backbone.resolve(*self.spec.glance_config(c))) if self.spec.glance else None
        self.device = next(backbone.parameters()).device
        self.path = check_inference_path(path, self.device)
        self.merge_passes = merge_passes
        # the policy runs where the glance runs: a host round trip inside the glance would cost more than the
        # policy's few small products on a GPU, and a CUDA graph cannot record one
        artifact.to(self.device)
        # counted once: torch's FlopCounterMode is far slower than the forward it counts
        self.network_flops = float(artifact.network_flops())
        self.staged_flops = staged_flops(self.spec, c)
        self._points = {index: GridPoint.from_action(index, c.token_grans, c.ffn_widths)
                        for index in np.ndindex(*c.grid_shape)}
        # each function compiled on first use (``_on_path``); the glance, its features and the policy are one
        self._compiled: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0
        """Seconds spent building programs on their first calls (compiling, on the compiled paths): what a
        throughput figure leaves out. A recompile of the ``compiled`` path for a new batch-size class is not in it."""

    @classmethod
    def from_dirs(cls, backbone_dir: str | Path, policy_dir: str | Path, device: str = "cpu",
                  path: str = "eager", merge_passes: bool = False, tolerance: float | None = None
                  ) -> AdaptiveClassifier:
        """Load a checkpoint and a policy artifact; refuses a policy made for another backbone."""
        digest = backbone_hash(backbone_dir)
        # __init__ checks the hash
        return cls(load_checkpoint(backbone_dir, device), load_policy(policy_dir), digest, path=path,
                   merge_passes=merge_passes, tolerance=tolerance)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, config: GridPoint | None = None) -> Prediction:
        """Classify images ``(B, C, H, W)`` in ``[0, 1]``; ``config`` fixes one configuration (no policy)."""
        model = self.backbone
        model.check_images(images)
        config = None if config is None else GridPoint(*model.resolve(*config))  # fail before any compute
        if len(images) == 0:
            raise ImageError("no images to classify (empty batch)")
        if not images.is_floating_point():
            raise ImageError(f"images must be float in [0, 1], got {images.dtype}; divide uint8 images by 255")
        images = images.to(self.device)
        if config is not None:
            _check_finite(torch.isfinite(images).all())
            configs = [config] * len(images)
            logits = self._forward_config(images, config)
            per_input = np.full(len(images), float(flops(model.config, *config)))
            top = None
        else:
            logits, configs, per_input, top = self._adaptive(images)
        logits = logits.float()
        confidence, classes = top if top is not None else logits.softmax(-1).max(-1)
        return Prediction(logits.cpu(), classes.cpu(), confidence.cpu(), configs, per_input)

    @torch.inference_mode()
    def forward_config(self, images: torch.Tensor, config: GridPoint) -> torch.Tensor:
        """Logits ``(B, C)`` of images ``(B, C, H, W)`` at one configuration, a fresh pass on this classifier's path."""
        return self._owned(self._forward_config(images, config))

    def _forward_config(self, images: torch.Tensor, config: GridPoint) -> torch.Tensor:
        config = GridPoint(*config)
        return self._of_images(("forward", config), lambda x: self.backbone(x, *config), images)(images)

    def _owned(self, out):
        """``out`` (a tensor, or a tuple or list of them) made the caller's: on the graphs path a program returns
        its graph's output buffers, which the next call overwrites (``backbone.compiled.for_path``)."""
        if self.path != "graphs":
            return out
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    def _on_path(self, key: tuple, fn: Callable, args: tuple, batch_dims: tuple) -> Callable:
        """``fn`` on this classifier's path, made on the first call with ``args`` (``backbone.compiled.for_path``)."""
        found = self._compiled.get(key)
        if found is None:
            start = time.perf_counter()
            found = self._compiled[key] = for_path(fn, self.path, [self.backbone, self.artifact.policy], args,
                                                   batch_dims)
            if self.path in COMPILING_PATHS:
                found(*args)  # the compiled path compiles on this first call; the aot one loads its library
            self.compile_seconds += time.perf_counter() - start
        return found

    def _compiled_for_one(self, batch_size: int) -> bool:
        """Whether a call on ``batch_size`` inputs gets a program compiled for its shapes: one image on the aot path,
        as ``torch.compile`` does by itself (AOTInductor's programs otherwise serve every batch size). The glance's
        program is about 10% faster for one image that way (docs/experiments.md, part 7)."""
        return self.path == "aot" and batch_size == 1

    def _of_images(self, key: tuple, fn: Callable, images: torch.Tensor) -> Callable:
        """``fn`` of a batch of images alone, on this path (one image: see ``_compiled_for_one``)."""
        if self._compiled_for_one(len(images)):
            return self._on_path((*key, "one image"), fn, (images,), (None,))
        return self._on_path(key, fn, (images,), ("batch",))

    def _glance_and_act(self, images: torch.Tensor):
        """Embed, the read's keys and values, the glance, its features and the policy's actions ``(B, 3)``: torch
        operations only, so that the compiled paths make them one program."""
        model = self.backbone
        finite = torch.isfinite(images).all()  # checked by the caller, one kernel launch fewer
        input_tokens = model.embed(images)
        if not self.spec.glance:
            actions = self.artifact.act_tensor(features_from(input_tokens, None, self.spec), self._lam_column)
            return finite, input_tokens, actions
        k, v = model.read_kv(input_tokens)  # shared by the glance and every configuration
        glance_logits, state = model.glance(input_tokens, *self.spec.glance_config(model.config), read_kv=(k, v))
        actions = self.artifact.act_tensor(features_from(input_tokens, glance_logits, self.spec), self._lam_column)
        confidence, classes = glance_logits.float().softmax(-1).max(-1)  # the answer when the glance answers all
        # flat: faster to unpack (aot)
        return finite, input_tokens, actions, glance_logits, confidence, classes, k, v, *state.latents

    @torch.inference_mode()
    def choose(self, images: torch.Tensor) -> tuple[list[GridPoint], np.ndarray, torch.Tensor, torch.Tensor | None,
                                                    GlanceState | None]:
        """The glance and the policy's choice for images ``(B, C, H, W)``: each input's configuration, its FLOPs as
        paid ``(B,)``, the input tokens, and the glance's logits and state (None without a glance).

        Refuses images with NaN or infinite values (``ImageError``)."""
        configs, per_input, input_tokens, glance_logits, state = self._choose(images)[:5]
        if state is not None:
            state = GlanceState(state.config, self._owned(state.latents), self._owned(state.read_kv))
        return configs, per_input, *self._owned((input_tokens, glance_logits)), state

    def _choose(self, images: torch.Tensor):
        # ``choose`` without entering inference mode again (at batch 1 every microsecond shows), and with the
        # glance's confidence and class, or None
        finite, input_tokens, actions, *glance = self._of_images(("glance",), self._glance_and_act, images)(images)
        _check_finite(finite)
        glance_logits, state, glance_top = None, None, None
        if glance:
            glance_logits, confidence, classes, k, v, *latents = glance
            state, glance_top = GlanceState(self.glance_point, latents, (k, v)), (confidence, classes)
        actions = actions.cpu().numpy()  # (token index, depth - 1, width index)
        configs = [self._points[tuple(action)] for action in actions.tolist()]
        per_input = self.staged_flops[tuple(actions.T)].astype(np.float64) + self.network_flops
        return configs, per_input, input_tokens, glance_logits, state, glance_top

    @torch.inference_mode()
    def extend(self, state: GlanceState, config: GridPoint, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B', C)`` of the glance's inputs ``rows`` (all if None) extended to ``config``, on this path."""
        return self._owned(self._extend(state, config, rows))

    def _extend(self, state: GlanceState, config: GridPoint, rows: torch.Tensor | None) -> torch.Tensor:
        # one exit depth of ``_extend_exits``, whose programs it shares
        tokens, depth, width = self.backbone.resolve(*config)
        device = state.latents[0].device
        if rows is None:
            rows = torch.arange(len(state.latents[0]), device=device)
        none = torch.zeros(0, dtype=torch.long, device=device)
        return self._extend_exits(state, tokens, width, [none] * (depth - 1) + [rows])

    def _extend_exits(self, state: GlanceState, tokens: int, width: float, rows_at_depth: list[torch.Tensor],
                      tokens_at_depth: list[torch.Tensor] | None = None,
                      hidden_at_depth: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``AdaPerceiver.extend_exits`` on this path: one program per (tokens, width, deepest exit, which per-row
        token counts and widths are given), and for one image (``_compiled_for_one``) per rows at each depth too."""
        glance = state.config
        # absent per-row values travel as empty lists: one argument list for every program, none of their tensors
        per_row = [tokens_at_depth or [], hidden_at_depth or []]

        def extend_exits(latents: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, rows, row_tokens, row_hidden):
            return self.backbone.extend_exits(GlanceState(glance, list(latents), (k, v)), tokens, width, rows,
                                              row_tokens or None, row_hidden or None)

        key = ("exits", glance, tokens, width, len(rows_at_depth), *map(bool, per_row))
        args = (state.latents, *state.read_kv, rows_at_depth, *per_row)
        if self._compiled_for_one(len(state.latents[0])):
            # 18-30% faster than the program of every batch size at one image, whose exits at the depths where no
            # input leaves cost calls on empty tensors
            static = ([None] * len(state.latents), None, None, *([None] * len(p) for p in (rows_at_depth, *per_row)))
            fn = self._on_path((*key, "one image", *map(len, rows_at_depth)), extend_exits, args, static)
            return fn(*args)
        depths = [f"rows_{d}" for d in range(1, len(rows_at_depth) + 1)]
        fn = self._on_path(key, extend_exits, args, (["batch"] * len(state.latents), "batch", "batch", depths,
                                                      *[depths if p else [] for p in per_row]))
        if self.path != "graphs":
            return fn(*args)
        # a graph replays fixed shapes: each depth's rows (and their token counts and widths) padded to a power of
        # two, a handful of graphs per program instead of one per row count; the padding's logits dropped
        padded = padded_rows(rows_at_depth)
        logits = fn(state.latents, *state.read_kv, padded, *map(padded_rows, per_row))
        if all(p is rows for p, rows in zip(padded, rows_at_depth, strict=True)):
            return logits
        parts = logits.split([len(rows) for rows in padded])
        return torch.cat([part[: len(rows)] for part, rows in zip(parts, rows_at_depth, strict=True)])

    def _adaptive(self, images: torch.Tensor) -> tuple[torch.Tensor, list[GridPoint], np.ndarray, tuple | None]:
        """The glance, the policy's actions, then each group of inputs answered by the glance or extended.

        Logits, configurations, FLOPs per input and, when the glance answered every input, its (confidence, class).
        """
        model = self.backbone
        configs, per_input, input_tokens, glance_logits, state, glance_top = self._choose(images)
        if state is None:  # no glance to continue from: fresh passes, packed (eager on either path)
            return model.run_mixed(input_tokens, configs).float(), configs, per_input, None
        if len(configs) == 1 and configs[0] != state.config:  # one image, extended: no grouping needed
            return self._extend(state, configs[0], None).float(), configs, per_input, None
        answered, passes = extension_passes(configs, state.config, self.merge_passes)
        if not passes:  # the glance answers every input
            return glance_logits.float(), configs, per_input, glance_top
        logits = torch.empty_like(glance_logits, dtype=torch.float32)
        if answered:
            rows = torch.tensor(answered, device=images.device)
            logits[rows] = glance_logits[rows].float()

        def per_depth(by_depth: dict[int, list[int]], value: Callable[[int], int | float] = lambda i: i) -> list:
            return [torch.tensor([value(i) for i in by_depth.get(d, [])], dtype=torch.long, device=images.device)
                    for d in range(1, max(by_depth) + 1)]

        for (tokens, width), by_depth in passes.items():
            inputs = [configs[i] for rows in by_depth.values() for i in rows]
            # per-row token counts and FFN widths only where they differ from the pass's
            row_tokens = None if all(cfg.tokens == tokens for cfg in inputs) else per_depth(
                by_depth, lambda i: configs[i].tokens)
            row_hidden = None if all(cfg.width == width for cfg in inputs) else per_depth(
                by_depth, lambda i: model.config.ffn_hidden_units(configs[i].width))
            rows_at_depth = per_depth(by_depth)
            logits[torch.cat(rows_at_depth)] = self._extend_exits(state, tokens, width, rows_at_depth, row_tokens,
                                                                  row_hidden).float()
        return logits, configs, per_input, None

    def predict_batched(self, images: torch.Tensor, batch_size: int = 256, config: GridPoint | None = None) -> Prediction:
        """``predict`` over ``images`` ``(N, C, H, W)`` in chunks of ``batch_size`` (bounds memory), in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(images) == 0:
            return self.predict(images, config)  # raises the empty-batch error
        starts = range(0, len(images), batch_size)
        return Prediction.cat([self.predict(images[i : i + batch_size], config) for i in starts])


def extension_passes(configs: list[GridPoint], glance: GridPoint, merge: bool = True
                     ) -> tuple[list[int], dict[tuple, dict[int, list[int]]]]:
    """The inputs the glance answers, and the extension passes of the others: ``{(tokens, width): {depth: inputs}}``.

    Merged: one pass (``extend_exits``) per token count, at the widest of its inputs' FFN widths; inputs at the
    glance's token count join the next larger token count's pass when there is one. Each input still gets its
    own configuration's logits. On a CPU a pass costs a fixed ~0.5 ms at a few rows, which merging saves at the
    price of some arithmetic beyond the configurations' FLOPs (docs/experiments.md, part 6). Not merged: one
    pass per (tokens, width), whose arithmetic is exactly those FLOPs.
    """
    glance = GridPoint(*glance)
    answered, by_pass = [], {}
    for i, cfg in enumerate(configs):
        if cfg == glance:
            answered.append(i)
        else:
            by_pass.setdefault(cfg.tokens if merge else (cfg.tokens, cfg.width), []).append(i)
    if merge:
        larger = sorted(t for t in by_pass if t > glance.tokens)
        if glance.tokens in by_pass and larger:
            by_pass[larger[0]] += by_pass.pop(glance.tokens)
    passes = {}
    for inputs in by_pass.values():
        by_depth: dict[int, list[int]] = {}
        for i in inputs:
            by_depth.setdefault(configs[i].depth, []).append(i)
        passes[(max(configs[i].tokens for i in inputs), max(configs[i].width for i in inputs))] = by_depth
    return answered, passes


def padded_rows(rows_at_depth: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each ``(n,)`` row tensor padded at its end to the next power of two by repeating its first row (empty
    ones stay empty): ``extend_exits`` of the padded rows gives each depth's real rows first, then its padding."""
    padded = []
    for rows in rows_at_depth:
        n = len(rows)
        size = 1 << (n - 1).bit_length() if n else 0
        padded.append(torch.cat([rows, rows[:1].expand(size - n)]) if size > n else rows)
    return padded


def _check_finite(finite: torch.Tensor) -> None:
    """Refuse a batch whose ``torch.isfinite(images).all()`` is False."""
    if not bool(finite):
        raise ImageError("images contain NaN or infinite values; clean them before inference")
