"""Building blocks of the AdaPerceiver: rotary encoding, attention, Matryoshka FFN, block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, trunc_normal_
from torch import nn


def rope_tables(num_positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of 1-D rotary encoding, each ``(num_positions, head_dim)``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, heads, N, head_dim)`` by positions ``0..N-1`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention from ``queries`` to ``context``, with optional RoPE on either side."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, heads, Nk, head_dim)`` of context ``(B, Nk, D)``."""
        b, nk, d = context.shape
        k, v = self.kv(context).view(b, nk, 2, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        queries: torch.Tensor,
        context: torch.Tensor | None = None,
        rope_q: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_k: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """queries ``(B, Nq, D)``, context ``(B, Nk, D)`` or its ``project_kv`` as ``kv``, mask ``(Nq, Nk)`` (True = attend)."""
        b, nq, d = queries.shape
        q = self.q(queries).view(b, nq, self.num_heads, d // self.num_heads).transpose(1, 2)
        k, v = self.project_kv(context) if kv is None else kv
        return self.proj(attend(q, k, v, rope_q, rope_k, mask))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope_q: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_k: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Heads ``q`` ``(B, heads, Nq, hd)`` over ``k``, ``v`` ``(B, heads, Nk, hd)`` -> merged ``(B, Nq, heads * hd)``."""
    if rope_q is not None:
        q = apply_rope(q, *rope_q)
    if rope_k is not None:
        k = apply_rope(k, *rope_k)
    if q.device.type == "cpu" and not torch.is_grad_enabled() and matmul_softmax_on_cpu(q.shape[-2], k.shape[-2]):
        out = matmul_softmax(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, nq, hd = out.shape
    return out.transpose(1, 2).reshape(b, nq, h * hd)


def matmul_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` as two matrix products around a softmax: ``(B, heads, Nq, hd)``."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def matmul_softmax_on_cpu(num_queries: int, num_keys: int, compiled: bool | None = None) -> bool:
    """Whether CPU inference attends by matmul-softmax-matmul rather than torch's fused kernel, in a compiled
    graph (``compiled``; by default, whether torch is compiling now) or eagerly.

    Eager: always; the fused CPU kernel was 4-5x slower for a few latent queries over many input tokens (the
    read), and no faster for the latents' own attention. Compiled (``torch.compile``, AOTInductor): only for
    small score tiles, where the fused kernel's fixed cost dominates. Measured per tile at batch 1 and 256 (16
    heads of 8 dims; ``experiments/bench_attention.py``, docs/results.md#benchmarks): matmul-softmax was up to
    2x faster at batch 256 up to 256 scores per head (4x49, 8x8, 16x16), but its scores go through memory, and
    from 8x49 on it was slower at batch 256, by up to 4x and by different amounts from run to run; a single
    query compiles into a slow reduction loop unless it sees at most 4 keys.
    """
    if not (torch.compiler.is_compiling() if compiled is None else compiled):  # None: ask torch
        return True
    return num_queries * num_keys <= 256 and (num_queries > 1 or num_keys <= 4)


class MatryoshkaFFN(nn.Module):
    """Two-layer GELU FFN whose width ``w`` uses only the first ``h_w`` hidden units.

    At inference the weights are sliced (real savings); in training a per-sample
    width is applied by a hidden-unit mask, which gives the same numbers.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(
        self, x: torch.Tensor, hidden_units: int | None = None, hidden_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x ``(B, N, D)``; ``hidden_units`` slices, then ``hidden_mask`` ``(B, >= units)`` masks per sample.

        Both together run samples of several widths at the largest of them: a masked unit adds exactly zero.
        """
        n = self.fc1.out_features if hidden_units is None else hidden_units
        hidden = self.act(F.linear(x, self.fc1.weight[:n], self.fc1.bias[:n]))
        if hidden_mask is not None:
            hidden = hidden * hidden_mask[:, None, :n].to(x.dtype)
        return F.linear(hidden, self.fc2.weight[:, :n], self.fc2.bias)


class LatentBlock(nn.Module):
    """Pre-norm block over the latents: block-masked RoPE self-attention, then a Matryoshka FFN."""

    def __init__(self, dim: int, num_heads: int, hidden: int, layerscale_init: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values=layerscale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MatryoshkaFFN(dim, hidden)
        self.ls2 = LayerScale(dim, init_values=layerscale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        hidden_units: int | None = None,
        hidden_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.drop_path(self.ls1(self.attn(y, y, rope_q=rope, rope_k=rope, mask=mask)))
        y = self.ffn(self.norm2(x), hidden_units=hidden_units, hidden_mask=hidden_mask)
        return x + self.drop_path(self.ls2(y))

    def forward_rows(
        self,
        x: torch.Tensor,
        start: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        hidden_units: int | None = None,
    ) -> torch.Tensor:
        """Rows ``start:`` of ``forward(x, ...)``, ``(B, N - start, D)``, computed for those rows only.

        Rows ``:start`` of ``x`` ``(B, N, D)`` serve only as keys and values: their queries,
        output projection and FFN are not computed. ``rope`` and ``mask`` cover at least the
        ``N`` positions, as for ``forward``.
        """
        n = x.shape[1]
        cos, sin = rope
        y = self.norm1(x)
        attended = self.attn(
            y[:, start:], y, rope_q=(cos[start:n], sin[start:n]), rope_k=(cos[:n], sin[:n]), mask=mask[start:n, :n]
        )
        x = x[:, start:] + self.drop_path(self.ls1(attended))
        y = self.ffn(self.norm2(x), hidden_units=hidden_units)
        return x + self.drop_path(self.ls2(y))


def init_weights(module: nn.Module) -> None:
    """ViT-style init: truncated-normal linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
