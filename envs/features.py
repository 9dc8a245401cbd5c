"""Policy features: what the policy sees of an input before it picks a configuration.

Features are computed from the frozen backbone's public API, and their FLOPs are
charged to the policy in every number the project reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from backbone import AdaPerceiver, AdaPerceiverConfig, flops, input_adapter_flops


@dataclass(frozen=True)
class FeatureSpec:
    """Which features the policy gets (default: the glance only; pooled tokens let the policy memorise inputs).

    ``pooled``: the mean of the input tokens ``(D,)`` (the input adapter is paid
    by every configuration anyway). ``glance``: the softmax ``(C,)`` and max
    probability of a short pass at ``glance_config`` (its read, blocks and write
    are charged to the policy).
    """

    pooled: bool = False
    glance: bool = True
    glance_tokens: int | None = None
    """Tokens of the glance pass (None: the smallest granularity)."""
    glance_depth: int = 1
    glance_width: float | None = None
    """Width of the glance pass (None: the smallest width)."""

    def glance_config(self, config: AdaPerceiverConfig) -> tuple[int, int, float]:
        tokens = config.token_grans[0] if self.glance_tokens is None else self.glance_tokens
        width = config.ffn_widths[0] if self.glance_width is None else self.glance_width
        return tokens, self.glance_depth, width

    def dim(self, config: AdaPerceiverConfig) -> int:
        return (config.embed_dim if self.pooled else 0) + ((config.num_classes + 1) if self.glance else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def feature_flops(spec: FeatureSpec, config: AdaPerceiverConfig) -> int:
    """FLOPs per image of the features beyond what the chosen configuration's pass shares with them.

    The glance reuses the patch embedding and the read's keys and values (``read_kv``), so it
    pays only its latents' read, its blocks and its write.
    """
    if not spec.glance:
        return 0
    return flops(config, *spec.glance_config(config)) - input_adapter_flops(config)


@torch.inference_mode()
def compute_features(
    model: AdaPerceiver, input_tokens: torch.Tensor, spec: FeatureSpec, read_kv: tuple | None = None
) -> torch.Tensor:
    """Features ``(B, F)`` float32 from the input tokens ``(B, P, D)`` of ``model.embed`` (and their ``read_kv``)."""
    parts = []
    if spec.pooled:
        parts.append(input_tokens.float().mean(dim=1))
    if spec.glance:
        probs = model.run(input_tokens, *spec.glance_config(model.config), read_kv=read_kv).float().softmax(-1)
        parts.append(probs)
        parts.append(probs.amax(-1, keepdim=True))
    if not parts:
        raise ValueError("FeatureSpec selects no features; enable pooled and/or glance")
    return torch.cat(parts, dim=-1)
