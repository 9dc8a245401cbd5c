"""The configuration grid: its points, their action indices, and every point's logits over a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from backbone.folders import ImageFiles, image_batches
from backbone.model import AdaPerceiver


class GridPoint(NamedTuple):
    """One configuration of the grid, in the paper's vocabulary (a plain tuple, so it compares equal to one)."""

    tokens: int
    """Latent tokens: one of the token granularities."""
    depth: int
    """Exit depth, 1-based: the number of latent blocks run."""
    width: float
    """FFN width: one of the Matryoshka widths, as a fraction of the hidden units."""

    @classmethod
    def from_action(cls, action: Sequence[int], token_grans: Sequence[int], ffn_widths: Sequence[float]) -> GridPoint:
        """The point of an action ``(token index, depth - 1, width index)`` (a ``MultiDiscrete([K, L, M])`` sample)."""
        k, l, m = (int(a) for a in action)
        return cls(int(token_grans[k]), l + 1, float(ffn_widths[m]))

    @property
    def name(self) -> str:
        """``tokens/depth/width`` as reports print it, e.g. ``32/6/0.5``."""
        return "/".join(f"{v:g}" for v in self)

    def action(self, token_grans: Sequence[int], ffn_widths: Sequence[float]) -> tuple[int, int, int]:
        """The action indices ``(token index, depth - 1, width index)`` of this point."""
        return list(token_grans).index(self.tokens), self.depth - 1, [float(w) for w in ffn_widths].index(float(self.width))


@torch.inference_mode()
def grid_logits(model: AdaPerceiver, images: torch.Tensor | ImageFiles, batch_size: int = 512) -> torch.Tensor:
    """Logits ``(n, K, L, M, C)`` of every (tokens, depth, width), one grid pass per width; ``images`` in memory
    ``(n, C, H, W)`` or image files, read batch by batch."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in image_batches(images, batch_size):
        input_tokens = model.embed(batch.to(device))
        per_width = [model.run_grid(input_tokens, w).float().cpu() for w in model.config.ffn_widths]
        out.append(torch.stack(per_width, dim=3))
    return torch.cat(out)


def grid_accuracy(model: AdaPerceiver, images: torch.Tensor | ImageFiles, labels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Top-1 accuracy ``(K, L, M)`` of every configuration."""
    logits = grid_logits(model, images, batch_size)
    return (logits.argmax(-1) == labels[:, None, None, None]).float().mean(0)


def format_grid(model_config, accuracy: torch.Tensor) -> str:
    """A text table per width: rows = token granularity, columns = exit depth, entries in %."""
    c = model_config
    lines = []
    for m, w in enumerate(c.ffn_widths):
        lines.append(f"width {w:g}  (rows: tokens, columns: depth 1..{c.depth}, accuracy %)")
        for k, g in enumerate(c.token_grans):
            lines.append(f"  {g:>4} | " + " ".join(f"{100 * a:6.2f}" for a in accuracy[k, :, m].tolist()))
    return "\n".join(lines)
