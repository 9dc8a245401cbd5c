"""Analytic FLOP model of the AdaPerceiver, and a checker built on torch's FlopCounterMode.

Convention: a multiply-add is 2 FLOPs; only matrix products (patch-embed convs,
linears, attention's QK^T and AV) are counted, attention as dense, exactly what
``FlopCounterMode`` counts. Norms, softmax, GELU and adds are left out (< 1%).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from backbone.config import AdaPerceiverConfig


def _attention(queries: int, keys: int, dim: int, kv_rows: int | None = None) -> int:
    """Projections (Q, KV, out) plus QK^T and AV for one image."""
    kv_rows = keys if kv_rows is None else kv_rows
    projections = 2 * queries * dim * dim + 2 * kv_rows * dim * 2 * dim + 2 * queries * dim * dim
    return projections + 2 * (2 * queries * keys * dim)


def embed_flops(config: AdaPerceiverConfig) -> int:
    """FLOPs of the input adapter (patch embedding) for one image; shared by every configuration."""
    c = config
    if not c.stem_channels:
        return 2 * c.num_patches * (c.in_chans * c.patch_size**2) * c.embed_dim
    total, side, chans = 0, c.img_size, c.in_chans
    for out_chans in c.stem_channels:  # 3x3 stride-2 convs, each halving the side
        side //= 2
        total += 2 * side * side * 9 * chans * out_chans
        chans = out_chans
    return total + 2 * c.num_patches * chans * c.embed_dim


def input_adapter_flops(config: AdaPerceiverConfig) -> int:
    """FLOPs of what every pass over an image shares: patch embedding and the read's key/value projection."""
    c = config
    return embed_flops(c) + 2 * c.num_patches * c.embed_dim * 2 * c.embed_dim


def flops(config: AdaPerceiverConfig, tokens: int | None = None, depth: int | None = None, width: float | None = None) -> int:
    """FLOPs of one image at ``(tokens, depth, width)``: patch embed, read, ``depth`` blocks, write, head."""
    c = config
    g, depth, hidden = _resolve(c, tokens, depth, width)
    d = c.embed_dim
    read = _attention(g, c.num_patches, d)
    block = _attention(g, g, d) + 2 * (2 * g * d * hidden)
    return embed_flops(c) + read + depth * block + readout_flops(c, g)


def _over_grid(config: AdaPerceiverConfig, flops_of: Callable[[int, int, float], int]) -> torch.Tensor:
    """``flops_of(tokens, depth, width)`` at every configuration, ``(K, L, M)`` int64 (tokens x depth x width)."""
    c = config
    return torch.tensor(
        [[[flops_of(g, l, w) for w in c.ffn_widths] for l in range(1, c.depth + 1)] for g in c.token_grans],
        dtype=torch.int64,
    )


def flops_grid(config: AdaPerceiverConfig) -> torch.Tensor:
    """FLOPs of every configuration, ``(K, L, M)`` int64 (tokens x depth x width)."""
    return _over_grid(config, lambda g, l, w: flops(config, g, l, w))


def _resolve(config: AdaPerceiverConfig, tokens: int | None, depth: int | None, width: float | None) -> tuple[int, int, int]:
    """``(tokens, depth, FFN hidden units)`` of a configuration, ``None`` meaning the largest."""
    c = config
    g = c.max_tokens if tokens is None else tokens
    depth = c.depth if depth is None else depth
    c.token_index(g)
    c.check_depth(depth)
    return g, depth, c.ffn_hidden_units(1.0 if width is None else width)


def extension_flops(
    config: AdaPerceiverConfig,
    glance: tuple[int | None, int | None, float | None],
    target: tuple[int | None, int | None, float | None],
) -> int:
    """FLOPs one image pays in ``AdaPerceiver.extend`` from ``glance`` to ``target``, beyond the glance.

    0 when ``target == glance`` (the caller answers with the glance's logits). Otherwise, with
    glance ``(g0, l0, w0)`` and target ``(g, l, w)``: the read's new rows ``g0:g`` (their queries
    over the shared keys and values), then for blocks ``1..min(l, l0)`` at the same FFN width the
    new rows only (queries, output projection and FFN of ``g - g0`` rows, keys and values of all
    ``g``; nothing when ``g <= g0``), full blocks over ``g`` rows for the rest, and the write and
    head. Same convention as ``flops``.
    """
    c = config
    g0, l0, h0 = _resolve(c, *glance)
    g, l, h = _resolve(c, *target)
    if (g, l, h) == (g0, l0, h0):
        return 0
    d = c.embed_dim
    new = max(0, g - g0)
    read = _attention(new, c.num_patches, d, kv_rows=0)
    reused = min(l, l0) if h == h0 else 0
    new_rows_block = _attention(new, g, d, kv_rows=g) + 2 * (2 * new * d * h) if new else 0
    full_block = _attention(g, g, d) + 2 * (2 * g * d * h)
    return read + reused * new_rows_block + (l - reused) * full_block + readout_flops(c, g)


def cascade_flops(config: AdaPerceiverConfig, glance: tuple[int | None, int | None, float | None]) -> torch.Tensor:
    """FLOPs of a glance then every grid configuration, ``(K, L, M)`` int64 (tokens x depth x width).

    ``flops(config, *glance)`` (input adapter included) plus ``extension_flops`` to each target;
    at the glance's own grid point it is the glance alone.
    """
    first = flops(config, *glance)
    return _over_grid(config, lambda g, l, w: first + extension_flops(config, glance, (g, l, w)))


def readout_flops(config: AdaPerceiverConfig, tokens: int | None = None) -> int:
    """FLOPs of one extra write + head over ``tokens`` latents (what early exit pays per block it passes)."""
    c = config
    g = c.max_tokens if tokens is None else tokens
    return _attention(1, g, c.embed_dim) + 2 * c.embed_dim * c.num_classes


_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _register_cpu_sdpa_formula() -> None:
    # FlopCounterMode has no formula for the CPU flash kernel and would count its attention as 0.
    if _CPU_SDPA in flop_counter.flop_registry or _CPU_SDPA.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to 'Global'.

    The tracker's autograd hooks fail under ``torch.inference_mode`` (used by inference code),
    and only the total is needed here.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        return None


def measure_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs torch's ``FlopCounterMode`` counts while calling ``fn`` (CPU attention included)."""
    _register_cpu_sdpa_formula()
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())
