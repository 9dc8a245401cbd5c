"""Policy features: what the policy sees of an input before it picks a configuration.

Features are computed from the frozen backbone's public API. The glance is a real grid
point: a policy that picks it answers with the glance's own prediction, and any other
configuration extends the glance (``AdaPerceiver.extend``), so the glance's FLOPs are part
of every configuration's staged cost (``staged_flops``), never an overhead paid twice.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np
import torch

from backbone import AdaPerceiver, AdaPerceiverConfig, cascade_flops, flops_grid
from backbone.config import ConfigError
from backbone.errors import grid_point


@dataclass(frozen=True)
class FeatureSpec:
    """Which features the policy gets (default: the glance only; pooled tokens let the policy memorise inputs).

    ``pooled``: the mean of the input tokens ``(D,)`` (the input adapter is paid
    by every configuration anyway). ``glance``: the softmax ``(C,)`` of a short pass at
    ``glance_config`` and its confidence statistics (max probability, margin between the
    two largest probabilities, entropy in nats).
    """

    pooled: bool = False
    glance: bool = True
    glance_tokens: int | None = None
    """Tokens of the glance pass (None: the smallest granularity)."""
    glance_depth: int = 1
    glance_width: float | None = None
    """Width of the glance pass (None: the smallest width)."""

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        """The command-line flags ``from_flags`` reads: every script that builds or reads a policy's tables takes
        the same two, so a table built by one is the table the others look up."""
        parser.add_argument("--pooled", action="store_true", help="the policy's features include the mean input token")
        parser.add_argument("--glance", type=grid_point, default=None, metavar="TOKENS,DEPTH,WIDTH",
                            help="the glance pass the policy sees (its softmax and confidence) and extends "
                                 f"(default: the smallest tokens and width, depth {FeatureSpec.glance_depth})")

    @classmethod
    def from_flags(cls, pooled: bool = False, glance: tuple[int, int, float] | None = None) -> FeatureSpec:
        """The spec of the command-line flags ``--pooled`` and ``--glance TOKENS,DEPTH,WIDTH`` (None: the default glance)."""
        if glance is None:
            return cls(pooled=pooled)
        tokens, depth, width = glance
        return cls(pooled=pooled, glance_tokens=tokens, glance_depth=depth, glance_width=width)

    def glance_config(self, config: AdaPerceiverConfig) -> tuple[int, int, float]:
        tokens = config.token_grans[0] if self.glance_tokens is None else self.glance_tokens
        width = config.ffn_widths[0] if self.glance_width is None else self.glance_width
        return tokens, self.glance_depth, width

    def check(self, config: AdaPerceiverConfig) -> None:
        """Refuse (``ConfigError``) a glance that is not a grid point of ``config``, before any table is built."""
        if not self.glance:
            return
        tokens, depth, width = self.glance_config(config)
        try:
            config.token_index(tokens), config.check_depth(depth), config.width_index(width)
        except ConfigError as err:
            raise ConfigError(f"glance ({tokens}, {depth}, {width}) is not a configuration of this backbone: {err}; "
                              f"pass --glance TOKENS,DEPTH,WIDTH from tokens {list(config.token_grans)}, "
                              f"depths 1..{config.depth}, widths {list(config.ffn_widths)}") from None

    def dim(self, config: AdaPerceiverConfig) -> int:
        return (config.embed_dim if self.pooled else 0) + ((config.num_classes + 3) if self.glance else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def staged_flops(spec: FeatureSpec, config: AdaPerceiverConfig) -> np.ndarray:
    """Backbone FLOPs per image ``(K, L, M)`` of the features and then each configuration, as paid.

    With a glance, the glance's grid point costs the glance alone (its prediction is the
    answer) and every other point costs the glance plus its extension; without one, each
    point is a fresh pass (pooled input tokens are shared with it).
    """
    grid = cascade_flops(config, spec.glance_config(config)) if spec.glance else flops_grid(config)
    return grid.numpy().astype(np.int64)


def glance_features(probs: torch.Tensor) -> torch.Tensor:
    """Glance features ``(B, C + 3)`` from its softmax ``(B, C)``: probabilities, max, margin, entropy."""
    top2 = probs.topk(2, dim=-1).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1, keepdim=True)
    return torch.cat([probs, top2[:, :1], top2[:, :1] - top2[:, 1:], entropy], dim=-1)


def features_from(input_tokens: torch.Tensor, glance_logits: torch.Tensor | None, spec: FeatureSpec) -> torch.Tensor:
    """Features ``(B, F)`` float32 from input tokens ``(B, P, D)`` and the glance's logits ``(B, C)``."""
    parts = []
    if spec.pooled:
        parts.append(input_tokens.float().mean(dim=1))
    if spec.glance:
        parts.append(glance_features(glance_logits.float().softmax(-1)))
    if not parts:
        raise ValueError("FeatureSpec selects no features; enable pooled and/or glance")
    return torch.cat(parts, dim=-1)


@torch.inference_mode()
def compute_features(
    model: AdaPerceiver, input_tokens: torch.Tensor, spec: FeatureSpec, read_kv: tuple | None = None
) -> torch.Tensor:
    """Features ``(B, F)`` float32 from the input tokens ``(B, P, D)`` of ``model.embed`` (and their ``read_kv``)."""
    logits = model.run(input_tokens, *spec.glance_config(model.config), read_kv=read_kv) if spec.glance else None
    return features_from(input_tokens, logits, spec)
