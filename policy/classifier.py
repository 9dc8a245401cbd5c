"""Adaptive inference: glance -> features -> policy -> each input answered by the glance or extended to its configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backbone import AdaPerceiver, flops
from backbone.checkpoint import backbone_hash, load_checkpoint
from backbone.grid import GridPoint
from backbone.model import GlanceState
from envs import features_from, staged_flops
from policy.artifact import PolicyArtifact, PolicyArtifactError, check_backbone_hash, load_policy


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
                 lam: float | None = None) -> None:
        """Check the policy's action grid is the backbone's and, given ``backbone_hash``, that it was made for it.

        ``lam`` sets the FLOP price of a price-conditioned policy (default: its calibrated price).
        """
        c = backbone.config
        for key, value in c.grid_axes().items():
            found = artifact.meta.get(key)
            if found is None or [float(v) for v in found] != [float(v) for v in value]:
                raise PolicyArtifactError(f"policy {key} {found} do not match the backbone's {value}; "
                                 "train a policy for this backbone with experiments/train_policy.py")
        check_backbone_hash(artifact.meta, backbone_hash, "the policy")
        self.backbone = backbone.eval()
        self.artifact, self.lam, self.spec = artifact, lam, artifact.feature_spec
        # counted once: torch's FlopCounterMode is far slower than the forward it counts
        self.network_flops = float(artifact.network_flops())
        self.staged_flops = staged_flops(self.spec, c)

    @classmethod
    def from_dirs(cls, backbone_dir: str | Path, policy_dir: str | Path, device: str = "cpu") -> AdaptiveClassifier:
        """Load a checkpoint and a policy artifact; refuses a policy made for another backbone."""
        digest = backbone_hash(backbone_dir)
        return cls(load_checkpoint(backbone_dir, device), load_policy(policy_dir), digest)  # __init__ checks the hash

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, config: GridPoint | None = None) -> Prediction:
        """Classify images ``(B, C, H, W)`` in ``[0, 1]``; ``config`` fixes one configuration (no policy)."""
        model = self.backbone
        model.check_images(images)
        config = None if config is None else GridPoint(*model.resolve(*config))  # fail before any compute
        if len(images) == 0:
            raise ValueError("no images to classify (empty batch)")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got {images.dtype}; divide uint8 images by 255")
        images = images.to(next(model.parameters()).device)
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values; clean them before inference")
        input_tokens = model.embed(images)
        read_kv = model.read_kv(input_tokens)  # shared by the glance and every configuration
        if config is not None:
            configs = [config] * len(images)
            logits = model.run_mixed(input_tokens, configs, read_kv)
            per_input = np.full(len(images), float(flops(model.config, *config)))
        else:
            logits, configs, per_input = self._adaptive(input_tokens, read_kv)
        probs = logits.softmax(-1)
        return Prediction(logits.cpu(), probs.argmax(-1).cpu(), probs.amax(-1).cpu(), configs, per_input)

    @torch.inference_mode()
    def choose(self, input_tokens: torch.Tensor, read_kv) -> tuple[list[GridPoint], np.ndarray, torch.Tensor | None, GlanceState | None]:
        """The glance and the policy's choice for input tokens ``(B, P, D)``: each input's configuration, its FLOPs
        as paid ``(B,)``, and the glance's logits and state (None without a glance)."""
        model, c = self.backbone, self.backbone.config
        glance_logits, state = None, None
        if self.spec.glance:
            glance_logits, state = model.glance(input_tokens, *self.spec.glance_config(c), read_kv=read_kv)
        features = features_from(input_tokens, glance_logits, self.spec).cpu().numpy()
        actions = self.artifact.act(features, lam=self.lam)  # (token index, depth - 1, width index)
        configs = [GridPoint.from_action(a, c.token_grans, c.ffn_widths) for a in actions]
        per_input = self.staged_flops[tuple(actions.T)].astype(np.float64) + self.network_flops
        return configs, per_input, glance_logits, state

    def _adaptive(self, input_tokens: torch.Tensor, read_kv) -> tuple[torch.Tensor, list[GridPoint], np.ndarray]:
        """The glance, the policy's actions, then each group of inputs answered by the glance or extended."""
        model = self.backbone
        configs, per_input, glance_logits, state = self.choose(input_tokens, read_kv)
        if state is None:  # no glance to continue from: fresh passes, packed
            return model.run_mixed(input_tokens, configs, read_kv).float(), configs, per_input
        logits = torch.empty_like(glance_logits, dtype=torch.float32)
        groups: dict[GridPoint, list[int]] = {}
        for i, cfg in enumerate(configs):
            groups.setdefault(cfg, []).append(i)
        for cfg, members in groups.items():
            rows = torch.tensor(members, device=input_tokens.device)
            if cfg == state.config:  # the glance answers
                logits[rows] = glance_logits[rows].float()
            else:
                logits[rows] = model.extend(state, *cfg, rows=rows).float()
        return logits, configs, per_input

    def predict_batched(self, images: torch.Tensor, batch_size: int = 256, config: GridPoint | None = None) -> Prediction:
        """``predict`` over ``images`` ``(N, C, H, W)`` in chunks of ``batch_size`` (bounds memory), in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(images) == 0:
            return self.predict(images, config)  # raises the empty-batch error
        starts = range(0, len(images), batch_size)
        return Prediction.cat([self.predict(images[i : i + batch_size], config) for i in starts])
