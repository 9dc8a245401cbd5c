"""Adaptive inference: the glance and its policy choose each input's configuration; the glance answers the inputs
it was chosen for, and extension passes answer the others. A ``Runner`` (``path=``) runs each step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backbone import AdaPerceiver, flops
from backbone.checkpoint import backbone_hash, load_checkpoint
from backbone.grid import GridPoint
from backbone.model import GlanceState, ImageError
from envs import staged_flops
from inference.paths import make_runner
from inference.plan import ExtensionPass, plan_extensions
from inference.runner import Glance, Runner
from policy.artifact import PolicyArtifact, PolicyArtifactError, check_backbone_hash, load_policy
from policy.second_look import looked_again, second_look_cost
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
    when the glance answers), the second look's extension to the full configuration where there was one, and the
    policy network."""

    @classmethod
    def cat(cls, parts: list[Prediction]) -> Prediction:
        """One prediction from consecutive batches' predictions (order kept)."""
        return cls(torch.cat([p.logits for p in parts]), torch.cat([p.classes for p in parts]),
                   torch.cat([p.confidence for p in parts]), [c for p in parts for c in p.configs],
                   np.concatenate([p.flops for p in parts]))


@dataclass
class Choice:
    """The policy's choice for a batch: each input's configuration and its FLOPs as paid, with the glance."""

    configs: list[GridPoint]
    flops: np.ndarray
    """``(B,)`` float64."""
    glance: Glance


class AdaptiveClassifier:
    """A frozen backbone with a policy that picks each input's configuration."""

    def __init__(self, backbone: AdaPerceiver, artifact: PolicyArtifact, backbone_hash: str | None = None,
                 lam: float | None = None, path: str = "eager", merge_passes: bool = False,
                 tolerance: float | None = None) -> None:
        """Check the policy's action grid is the backbone's and, given ``backbone_hash``, that it was made for it.

        ``lam`` sets the FLOP price of a price-conditioned policy (default: its calibrated price). ``tolerance``
        (a disagreement with the full model, in %) sets it instead to the cheapest price the artifact's operating
        points certify at that tolerance (``experiments/calibrate.py`` writes them); a tolerance nothing certifies
        is refused with a ``NothingCertifiedError`` that says what would be. ``path`` names the runner, one of
        ``inference.paths.INFERENCE_PATHS``; all give the same logits within float noise, and the compiling
        and exporting ones build each program on its first use (seconds each). The policy network moves to the backbone's
        device. ``merge_passes`` (off by default): extend inputs of several configurations in one pass
        (``plan_extensions``): fewer, larger operator calls, but 3-6% more arithmetic than the configurations'
        FLOPs that ``Prediction.flops`` reports. Off, the arithmetic is exactly what ``predict`` reports.
        """
        c = backbone.config
        for key, value in c.grid_axes().items():
            found = artifact.meta.get(key)
            if found is None or [float(v) for v in found] != [float(v) for v in value]:
                raise PolicyArtifactError(f"policy {key} {found} do not match the backbone's {value}; "
                                          "train a policy for this backbone with experiments/train_policy.py")
        check_backbone_hash(artifact.meta, backbone_hash, "the policy")
        if tolerance is not None:
            if lam is not None:
                raise ValueError("give a price (lam) or a tolerance, not both")
            lam = certified_point(points_of(artifact.meta), tolerance).lam
        self.backbone, self.artifact, self.spec = backbone.eval(), artifact, artifact.feature_spec
        self.lam, self._price_column = lam, artifact.lam_column(lam)
        # the policy runs where the glance runs: a host round trip inside the glance would cost more than the
        # policy's few small products on a GPU, and a CUDA graph cannot record one
        artifact.to(next(backbone.parameters()).device)
        self.runner: Runner = make_runner(path, self.backbone, artifact)
        self.merge_passes = merge_passes
        self.glance_point = GridPoint(*backbone.resolve(*self.spec.glance_config(c))) if self.spec.glance else None
        """The glance's configuration; None for a policy without a glance."""
        # counted once: torch's FlopCounterMode is far slower than the forward it counts
        self.network_flops = float(artifact.network_flops())
        self.staged_flops = staged_flops(self.spec, c)
        self._points = {index: GridPoint.from_action(index, c.token_grans, c.ffn_widths)
                        for index in np.ndindex(*c.grid_shape)}
        self.full_point = GridPoint(c.token_grans[-1], c.depth, c.ffn_widths[-1])
        self.second_look = artifact.second_look
        """Threshold under which an extension's answer goes on to the full configuration (None: no second look)."""
        self.second_look_flops = 0.0
        """FLOPs of the second look's extension from the glance to the full configuration (0 without one)."""
        if self.second_look is not None:
            if self.glance_point is None:
                raise PolicyArtifactError("a second look continues from the glance; this policy has none")
            self._look_actions = tuple(p.action(c.token_grans, c.ffn_widths) for p in (self.glance_point, self.full_point))
            self.second_look_flops = second_look_cost(self.staged_flops, self._look_actions[0])

    @classmethod
    def from_dirs(cls, backbone_dir: str | Path, policy_dir: str | Path, device: str = "cpu",
                  path: str = "eager", merge_passes: bool = False, tolerance: float | None = None
                  ) -> AdaptiveClassifier:
        """Load a checkpoint and a policy artifact; refuses a policy made for another backbone."""
        digest = backbone_hash(backbone_dir)
        return cls(load_checkpoint(backbone_dir, device), load_policy(policy_dir), digest, path=path,
                   merge_passes=merge_passes, tolerance=tolerance)

    @property
    def path(self) -> str:
        return self.runner.name

    @property
    def compile_seconds(self) -> float:
        """Seconds this classifier's runner spent building programs (what a throughput figure leaves out)."""
        return self.runner.compile_seconds

    def with_merge_passes(self, merge_passes: bool) -> AdaptiveClassifier:
        """This classifier with the other extension rule, sharing its runner (and so its built programs)."""
        twin = object.__new__(AdaptiveClassifier)
        twin.__dict__ |= self.__dict__ | {"merge_passes": merge_passes}
        return twin

    def with_price(self, lam: float | None) -> AdaptiveClassifier:
        """This classifier acting at FLOP price ``lam`` (None: the policy's calibrated price), sharing its runner:
        a server moves along the operating points per request without loading anything again."""
        twin = object.__new__(AdaptiveClassifier)
        twin.__dict__ |= self.__dict__ | {"lam": lam, "_price_column": self.artifact.lam_column(lam)}
        return twin

    # ---- the story ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, images: torch.Tensor, config: GridPoint | None = None) -> Prediction:
        """Classify images ``(B, C, H, W)`` in ``[0, 1]``; ``config`` fixes one configuration (no policy)."""
        images = self._checked(images)
        if config is not None:
            config = GridPoint(*self.backbone.resolve(*config))
            _check_finite(torch.isfinite(images).all())
            logits = self.runner.forward(images, config).float()
            return _prediction(logits, [config] * len(images), np.full(len(images), float(flops(self.backbone.config, *config))))
        choice = self._choose(images)
        logits, top = self._answer(choice)
        logits, again = self.look_again(choice.glance.state, choice.configs, logits)
        if not again.any():
            return _prediction(logits, choice.configs, choice.flops, top)
        configs = [self.full_point if a else config for config, a in zip(choice.configs, again, strict=True)]
        return _prediction(logits, configs, choice.flops + again * self.second_look_flops)

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` on the backbone's device, once their shape, size and dtype are checked (``ImageError``)."""
        self.backbone.check_images(images)
        if len(images) == 0:
            raise ImageError("no images to classify (empty batch)")
        if not images.is_floating_point():
            raise ImageError(f"images must be float in [0, 1], got {images.dtype}; divide uint8 images by 255")
        return images.to(self.runner.device)

    def _choose(self, images: torch.Tensor) -> Choice:
        glance = self.runner.glance(images, self._price_column)
        _check_finite(glance.finite)
        actions = glance.actions.cpu().numpy()  # (token index, depth - 1, width index)
        configs = [self._points[tuple(action)] for action in actions.tolist()]
        return Choice(configs, self._paid(actions), glance)

    def _answer(self, choice: Choice) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Logits ``(B, C)`` of every input, and the glance's (confidence, class) when it answered them all."""
        glance, configs = choice.glance, choice.configs
        if glance.state is None:  # no glance to continue from: fresh passes, packed
            return self.backbone.run_mixed(glance.input_tokens, configs).float(), None
        plan = plan_extensions(configs, glance.state.config, self.merge_passes)
        if not plan.passes:
            return glance.logits.float(), (glance.confidence, glance.classes)
        if not plan.answered and len(plan.passes) == 1 and plan.passes[0].rows == list(range(len(configs))):
            return self.runner.extend(glance.state, plan.passes[0]).float(), None  # already in batch order
        logits = torch.empty_like(glance.logits, dtype=torch.float32)
        if plan.answered:
            rows = torch.tensor(plan.answered, device=logits.device)
            logits[rows] = glance.logits[rows].float()
        for extension in plan.passes:
            logits[torch.tensor(extension.rows, device=logits.device)] = self.runner.extend(glance.state, extension).float()
        return logits, None

    def look_again(self, state: GlanceState | None, configs: list[GridPoint], logits: torch.Tensor
                   ) -> tuple[torch.Tensor, np.ndarray]:
        """The second look over a batch answered at ``configs`` with ``logits`` ``(B, C)``: the logits with the rows it
        sends on replaced by the full configuration's, extended from the glance ``state`` of the same rows, and which
        rows those are ``(B,)`` bool (none without a second look)."""
        again = self.looked_again(configs, logits)
        if again.any():
            rows = np.flatnonzero(again)
            logits = logits.clone()
            logits[torch.from_numpy(rows).to(logits.device)] = self.extend(state, self.full_point, rows).float()
        return logits, again

    def looked_again(self, configs: list[GridPoint], logits: torch.Tensor) -> np.ndarray:
        """Which inputs ``(B,)`` bool the second look sends on to the full configuration, from their configurations
        and the logits ``(B, C)`` they were answered with (none without a second look)."""
        if self.second_look is None:
            return np.zeros(len(configs), bool)
        c = self.backbone.config
        actions = np.array([config.action(c.token_grans, c.ffn_widths) for config in configs])
        confidence = logits.float().softmax(-1).amax(-1).cpu().numpy()
        return looked_again(confidence, actions, *self._look_actions, self.second_look)

    def _paid(self, actions: np.ndarray) -> np.ndarray:
        """FLOPs per input ``(B,)`` as paid for actions ``(B, 3)``: its staged configuration and the policy."""
        return self.staged_flops[tuple(actions.T)].astype(np.float64) + self.network_flops

    # ---- the steps, for benchmarks and tests ------------------------------------------------------------
    @torch.inference_mode()
    def choose(self, images: torch.Tensor) -> Choice:
        """The glance and the policy's choice for images ``(B, C, H, W)``; refuses NaN or infinite pixels."""
        return self._choose(self._checked(images))

    @torch.inference_mode()
    def predict_assigned(self, images: torch.Tensor, configs: list[GridPoint]) -> Prediction:
        """``predict`` with input ``i`` answered at ``configs[i]`` instead of the policy's choice: the glance and the
        policy run as in ``predict`` (their cost is paid), then the same plan and extension passes answer each input.
        What a policy that chose ``configs`` costs, for timing a mix of configurations without a trained policy."""
        glance = self._choose(self._checked(images)).glance
        if len(configs) != len(images):
            raise ValueError(f"{len(configs)} configurations for {len(images)} images")
        configs = [GridPoint(*self.backbone.resolve(*config)) for config in configs]
        paid = self.paid_flops(configs)
        logits, top = self._answer(Choice(configs, paid, glance))
        return _prediction(logits, configs, paid, top)

    @torch.inference_mode()
    def extend(self, state: GlanceState, config: GridPoint, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B', C)`` of the glance's inputs ``rows`` (all if None) extended to ``config``, on this path."""
        tokens, depth, width = self.backbone.resolve(*config)
        rows = tuple(range(len(state.latents[0]))) if rows is None else tuple(int(i) for i in rows)
        return self.runner.extend(state, ExtensionPass(tokens, width, ((),) * (depth - 1) + (rows,)))

    @torch.inference_mode()
    def forward_config(self, images: torch.Tensor, config: GridPoint) -> torch.Tensor:
        """Logits ``(B, C)`` of images ``(B, C, H, W)`` at one configuration, a fresh pass on this classifier's path."""
        return self.runner.forward(self._checked(images), GridPoint(*self.backbone.resolve(*config)))

    def paid_flops(self, configs: list[GridPoint]) -> np.ndarray:
        """FLOPs per input ``(B,)`` as this classifier pays them for ``configs``: glance, extension, policy."""
        c = self.backbone.config
        return self._paid(np.array([GridPoint(*cfg).action(c.token_grans, c.ffn_widths) for cfg in configs]))

    def predict_batched(self, images: torch.Tensor, batch_size: int = 256, config: GridPoint | None = None) -> Prediction:
        """``predict`` over ``images`` ``(N, C, H, W)`` in chunks of ``batch_size`` (bounds memory), in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(images) == 0:
            return self.predict(images, config)  # raises the empty-batch error
        starts = range(0, len(images), batch_size)
        return Prediction.cat([self.predict(images[i : i + batch_size], config) for i in starts])


def _prediction(logits: torch.Tensor, configs: list[GridPoint], paid: np.ndarray,
                top: tuple[torch.Tensor, torch.Tensor] | None = None) -> Prediction:
    confidence, classes = top if top is not None else logits.softmax(-1).max(-1)
    return Prediction(logits.cpu(), classes.cpu(), confidence.cpu(), configs, paid)


def _check_finite(finite: torch.Tensor) -> None:
    """Refuse a batch whose ``torch.isfinite(images).all()`` is False."""
    if not bool(finite):
        raise ImageError("images contain NaN or infinite values; clean them before inference")
