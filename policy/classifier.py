"""Adaptive inference: features -> policy -> group the batch by configuration -> run each group."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backbone import AdaPerceiver, flops
from backbone.checkpoint import backbone_hash, load_checkpoint
from envs import compute_features
from policy.artifact import PolicyArtifact, load_policy

Config = tuple[int, int, float]


@dataclass
class Prediction:
    logits: torch.Tensor
    """``(B, C)`` float32, in input order."""
    classes: torch.Tensor
    """``(B,)`` int64 predicted classes."""
    confidence: torch.Tensor
    """``(B,)`` max softmax probability."""
    configs: list[Config]
    """``(tokens, depth, width)`` each input ran at."""
    flops: np.ndarray
    """``(B,)`` FLOPs per input: its configuration plus the policy's features and network."""


def run_grouped(model: AdaPerceiver, input_tokens: torch.Tensor, configs: list[Config]) -> torch.Tensor:
    """Logits ``(B, C)``: each distinct configuration runs once, on its own inputs, with sliced weights."""
    logits = torch.empty(len(configs), model.config.num_classes, device=input_tokens.device)
    groups: dict[Config, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(tuple(config), []).append(i)
    for config, rows in groups.items():
        index = torch.tensor(rows, device=input_tokens.device)
        logits[index] = model.run(input_tokens[index], *config).float()
    return logits


class AdaptiveClassifier:
    """A frozen backbone with a policy that picks each input's configuration."""

    def __init__(self, backbone: AdaPerceiver, artifact: PolicyArtifact, backbone_hash: str | None = None) -> None:
        c = backbone.config
        expected = {"token_grans": list(c.token_grans), "depths": list(range(1, c.depth + 1)), "ffn_widths": list(c.ffn_widths)}
        for key, value in expected.items():
            if [float(v) for v in artifact.meta[key]] != [float(v) for v in value]:
                raise ValueError(f"policy {key} {artifact.meta[key]} do not match the backbone's {value}; "
                                 "train a policy for this backbone with experiments/train_policy.py")
        if backbone_hash is not None and artifact.meta.get("backbone_hash") != backbone_hash:
            raise ValueError("the policy was trained for another backbone (hash differs)")
        self.backbone = backbone.eval()
        self.artifact = artifact
        self.policy_flops = float(artifact.meta["feature_flops"] + artifact.network_flops())

    @classmethod
    def from_dirs(cls, backbone_dir: str | Path, policy_dir: str | Path, device: str = "cpu") -> AdaptiveClassifier:
        """Load a checkpoint and a policy artifact; refuses a policy made for another backbone."""
        digest = backbone_hash(backbone_dir)
        return cls(load_checkpoint(backbone_dir, device), load_policy(policy_dir, digest), digest)

    def choose(self, input_tokens: torch.Tensor) -> list[Config]:
        """The policy's configuration for each input, from its input tokens ``(B, P, D)``."""
        c = self.backbone.config
        features = compute_features(self.backbone, input_tokens, self.artifact.feature_spec).cpu().numpy()
        return [(c.token_grans[k], int(l) + 1, c.ffn_widths[m]) for k, l, m in self.artifact.act(features)]

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, config: Config | None = None) -> Prediction:
        """Classify images ``(B, C, H, W)`` in ``[0, 1]``; ``config`` fixes one configuration (no policy)."""
        model = self.backbone
        images = images.to(next(model.parameters()).device)
        model.check_images(images)
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values; clean them before inference")
        input_tokens = model.embed(images)
        if config is not None:
            config = model.resolve(*config)
            configs, overhead = [config] * len(images), 0.0
        else:
            configs, overhead = self.choose(input_tokens), self.policy_flops
        logits = run_grouped(model, input_tokens, configs)
        probs = logits.softmax(-1)
        per_input = np.array([flops(model.config, *cfg) for cfg in configs], dtype=np.float64) + overhead
        return Prediction(logits.cpu(), probs.argmax(-1).cpu(), probs.amax(-1).cpu(), configs, per_input)
