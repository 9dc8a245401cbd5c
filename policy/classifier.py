"""Adaptive inference: features -> policy -> the batch at each input's configuration (``run_mixed``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backbone import AdaPerceiver, flops
from backbone.checkpoint import backbone_hash, load_checkpoint
from backbone.model import ReadKV
from envs import compute_features
from policy.artifact import PolicyArtifact, PolicyArtifactError, load_policy

Config = tuple[int, int, float]
"""``(tokens, depth, width)``: one point of the backbone's configuration grid."""


@dataclass
class Prediction:
    """What the adaptive classifier says about a batch, in input order."""

    logits: torch.Tensor
    """``(B, C)`` float32, in input order."""
    classes: torch.Tensor
    """``(B,)`` int64 predicted classes."""
    confidence: torch.Tensor
    """``(B,)`` max softmax probability."""
    configs: list[Config]
    """``(tokens, depth, width)`` each input ran at."""
    flops: np.ndarray
    """``(B,)`` float64 FLOPs per input: its configuration plus the policy's features and network."""

    @classmethod
    def cat(cls, parts: list[Prediction]) -> Prediction:
        """One prediction from consecutive batches' predictions (order kept)."""
        return cls(torch.cat([p.logits for p in parts]), torch.cat([p.classes for p in parts]),
                   torch.cat([p.confidence for p in parts]), [c for p in parts for c in p.configs],
                   np.concatenate([p.flops for p in parts]))


class AdaptiveClassifier:
    """A frozen backbone with a policy that picks each input's configuration."""

    def __init__(self, backbone: AdaPerceiver, artifact: PolicyArtifact, backbone_hash: str | None = None) -> None:
        """Check the policy's action grid is the backbone's and, given ``backbone_hash``, that it was made for it."""
        c = backbone.config
        expected = {"token_grans": list(c.token_grans), "depths": list(range(1, c.depth + 1)),
                    "ffn_widths": list(c.ffn_widths)}
        for key, value in expected.items():
            found = artifact.meta.get(key)
            if found is None or [float(v) for v in found] != [float(v) for v in value]:
                raise ValueError(f"policy {key} {found} do not match the backbone's {value}; "
                                 "train a policy for this backbone with experiments/train_policy.py")
        if backbone_hash is not None and artifact.meta.get("backbone_hash") != backbone_hash:
            raise PolicyArtifactError(
                f"the policy was trained for backbone {str(artifact.meta.get('backbone_hash'))[:12]}..., not this one "
                f"({backbone_hash[:12]}...); train a policy for this backbone with experiments/train_policy.py"
            )
        self.backbone = backbone.eval()
        self.artifact = artifact
        # counted once: torch's FlopCounterMode is far slower than the forward it counts
        self.policy_flops = float(artifact.meta["feature_flops"] + artifact.network_flops())

    @classmethod
    def from_dirs(cls, backbone_dir: str | Path, policy_dir: str | Path, device: str = "cpu") -> AdaptiveClassifier:
        """Load a checkpoint and a policy artifact; refuses a policy made for another backbone."""
        digest = backbone_hash(backbone_dir)
        return cls(load_checkpoint(backbone_dir, device), load_policy(policy_dir), digest)  # __init__ checks the hash

    def choose(self, input_tokens: torch.Tensor, read_kv: ReadKV | None = None) -> list[Config]:
        """The policy's configuration for each input, from its input tokens ``(B, P, D)`` (and their read K/V)."""
        c = self.backbone.config
        features = compute_features(self.backbone, input_tokens, self.artifact.feature_spec, read_kv).cpu().numpy()
        # actions are (token index, depth - 1, width index)
        return [(c.token_grans[k], int(d) + 1, c.ffn_widths[w]) for k, d, w in self.artifact.act(features)]

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, config: Config | None = None) -> Prediction:
        """Classify images ``(B, C, H, W)`` in ``[0, 1]``; ``config`` fixes one configuration (no policy)."""
        model = self.backbone
        model.check_images(images)
        config = None if config is None else model.resolve(*config)  # fail before any compute
        if len(images) == 0:
            raise ValueError("no images to classify (empty batch)")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got {images.dtype}; divide uint8 images by 255")
        images = images.to(next(model.parameters()).device)
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values; clean them before inference")
        input_tokens = model.embed(images)
        read_kv = model.read_kv(input_tokens)  # shared by the glance and the packed pass
        if config is not None:
            configs, overhead = [config] * len(images), 0.0
        else:
            configs, overhead = self.choose(input_tokens, read_kv), self.policy_flops
        logits = model.run_mixed(input_tokens, configs, read_kv)
        probs = logits.softmax(-1)
        cost = {cfg: flops(model.config, *cfg) for cfg in set(configs)}
        per_input = np.array([cost[cfg] for cfg in configs], dtype=np.float64) + overhead
        return Prediction(logits.cpu(), probs.argmax(-1).cpu(), probs.amax(-1).cpu(), configs, per_input)

    def predict_batched(self, images: torch.Tensor, batch_size: int = 256, config: Config | None = None) -> Prediction:
        """``predict`` over ``images`` ``(N, C, H, W)`` in chunks of ``batch_size`` (bounds memory), in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(images) == 0:
            return self.predict(images, config)  # raises the empty-batch error
        starts = range(0, len(images), batch_size)
        return Prediction.cat([self.predict(images[i : i + batch_size], config) for i in starts])
