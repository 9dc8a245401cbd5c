"""Packed inference: every input of a batch at its own configuration, in one pass over the blocks.

The latents of every input still running are the rows of one matrix, ordered by
(width, tokens, deepest first). Each block runs its linear layers and the rotary encoding
once over all rows, the Matryoshka FFN once per width (sliced weights) and attention once
per group of inputs with the same token count; an input's rows leave the matrix once it is
written out at its depth. So a mix of small configurations costs about what its FLOPs say,
not one small, inefficient pass per configuration.

Built on the model's public stages only (``resolve``, ``read_kv``, ``read_latents``, ``blocks``,
``write_logits``, its RoPE tables and block mask): this module imports ``backbone.model``, which imports it
only inside ``run_mixed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from backbone.layers import LatentBlock, apply_rope, attend
from backbone.model import AdaPerceiver, ReadKV


class Segment(NamedTuple):
    """Consecutive inputs of the packed matrix with one token count, each attending within its own rows."""

    start: int
    """First row."""
    inputs: int
    """Number of inputs."""
    tokens: int
    """Rows (latents) per input."""


class FfnRows(NamedTuple):
    """Rows ``start:stop`` of the packed matrix share one FFN width."""

    start: int
    stop: int
    hidden: int
    """Hidden units of the FFN slice."""


class Group(NamedTuple):
    """The inputs of one (width, tokens), deepest first, while they run."""

    tokens: int
    hidden: int
    index: torch.Tensor
    """Their positions in the batch."""
    depths: list[int]


def forward_packed(block: LatentBlock, x: torch.Tensor, segments: list[Segment], ffn_rows: list[FfnRows],
                   rope_rows: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``block`` (inference) over many inputs' latents packed as rows ``(R, D)``.

    ``rope_rows`` are the cos and sin ``(R, head_dim)`` of each row's latent position; ``mask`` is
    the block mask over the largest token count.
    """
    rows, dim = x.shape
    heads = block.attn.num_heads
    cos, sin = rope_rows[0][:, None], rope_rows[1][:, None]
    y = block.norm1(x)
    q = apply_rope(block.attn.q(y).view(rows, heads, dim // heads), cos, sin)
    k, v = block.attn.kv(y).view(rows, 2, heads, dim // heads).unbind(1)
    k = apply_rope(k, cos, sin)
    mixed = torch.empty_like(x)
    for seg in segments:
        part = slice(seg.start, seg.start + seg.inputs * seg.tokens)
        per_input = [z[part].view(seg.inputs, seg.tokens, heads, dim // heads).transpose(1, 2) for z in (q, k, v)]
        mixed[part] = attend(*per_input, mask=mask[: seg.tokens, : seg.tokens]).view(seg.inputs * seg.tokens, dim)
    x = x + block.ls1(block.attn.proj(mixed))
    y = block.norm2(x)
    out = torch.empty_like(x)
    for ffn in ffn_rows:
        out[ffn.start : ffn.stop] = block.ffn(y[ffn.start : ffn.stop], hidden_units=ffn.hidden)
    return x + block.ls2(out)


def _layout(groups: list[Group]) -> tuple[list[Segment], list[FfnRows]]:
    """Where each group's rows lie, and the runs of rows that share an FFN width (adjacent by the ordering)."""
    segments, ffn_rows, start = [], [], 0
    for group in groups:
        stop = start + len(group.index) * group.tokens
        segments.append(Segment(start, len(group.index), group.tokens))
        if ffn_rows and ffn_rows[-1].hidden == group.hidden:
            ffn_rows[-1] = FfnRows(ffn_rows[-1].start, stop, group.hidden)
        else:
            ffn_rows.append(FfnRows(start, stop, group.hidden))
        start = stop
    return segments, ffn_rows


def run_mixed(model: AdaPerceiver, input_tokens: torch.Tensor, configs: Sequence[tuple[int, int, float]],
              read_kv: ReadKV | None = None) -> torch.Tensor:
    """Logits ``(B, C)`` of input tokens ``(B, P, D)``, input ``i`` at its own ``configs[i]``, in input order.

    The same numbers and FLOPs as ``model.run`` on each input alone, with sliced FFN weights.
    """
    if len(configs) != input_tokens.shape[0]:
        raise ValueError(f"need one configuration per input: {input_tokens.shape[0]} inputs, {len(configs)} configs")
    resolved = {cfg: model.resolve(*cfg) for cfg in set(configs)}
    configs = [resolved[cfg] for cfg in configs]
    device, dim = input_tokens.device, model.config.embed_dim
    logits = torch.empty(len(configs), model.config.num_classes, device=device)
    members: dict[tuple[float, int], list[int]] = {}
    for i, (tokens, _, width) in enumerate(configs):
        members.setdefault((width, tokens), []).append(i)
    groups = []
    for (width, tokens), rows in sorted(members.items()):
        rows.sort(key=lambda i: -configs[i][1])
        groups.append(Group(tokens, model.config.ffn_hidden_units(width), torch.tensor(rows, device=device),
                            [configs[i][1] for i in rows]))
    if not groups:
        return logits
    if len(groups) == 1 and len(set(groups[0].depths)) == 1:  # one configuration: nothing to pack
        logits[groups[0].index] = model.run(input_tokens, *configs[0], read_kv=read_kv).float()
        return logits
    read_kv = model.read_kv(input_tokens) if read_kv is None else read_kv
    reads = [model.read_latents(None, g.tokens, (read_kv[0][g.index], read_kv[1][g.index])).reshape(-1, dim) for g in groups]
    x = torch.cat(reads)
    positions = torch.cat([torch.arange(g.tokens, device=device).repeat(len(g.index)) for g in groups])
    rope_rows = (model.rope_cos[positions], model.rope_sin[positions])  # each row's latent position
    for depth, block in enumerate(model.blocks, start=1):
        if not groups:
            break
        segments, ffn_rows = _layout(groups)
        x = forward_packed(block, x, segments, ffn_rows, rope_rows, model.block_mask)
        kept, survivors, shrunk = [], [], False
        for seg, group in zip(segments, groups, strict=True):
            stay = sum(d > depth for d in group.depths)  # deepest first: those leaving are the tail
            if stay < seg.inputs:
                shrunk = True
                leaving = x[seg.start + stay * seg.tokens : seg.start + seg.inputs * seg.tokens]
                logits[group.index[stay:]] = model.write_logits(leaving.view(-1, seg.tokens, dim), (seg.tokens,))[:, 0].float()
            if stay:
                kept.append(slice(seg.start, seg.start + stay * seg.tokens))
                survivors.append(Group(group.tokens, group.hidden, group.index[:stay], group.depths[:stay]))
        if shrunk:
            x, *rope_rows = (torch.cat([z[rows] for rows in kept]) if kept else z[:0] for z in (x, *rope_rows))
        groups = survivors
    return logits
