"""The AdaPerceiver classifier: read -> latent blocks -> write, at any (tokens, depth, width).

Its ways to logits, each equal to ``forward`` at the same configuration up to float noise:

- ``forward`` (``run`` from input tokens): one configuration, a fresh pass;
- ``forward_grid`` (``run_grid``): training, every (tokens, depth) grid point from one pass at the largest tokens;
- ``glance`` + ``extend``: the reference continuation, a larger configuration from a small one's latents;
- ``extend_exits``: the fast continuation, several exit depths and per-row tokens and widths in one pass;
  ``extend`` is what it must equal, row for row;
- ``run_mixed`` (``backbone.packed``): fresh passes of inputs at their own configurations, packed into one
  pass over the blocks (one group of rows per configuration);
- ``forward_early_exit``: the confidence-threshold baseline.

All of them are built from the public stages ``embed`` -> ``read_kv`` -> ``read_latents`` -> ``blocks`` -> ``write_logits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.layers import HybridEmbed, PatchEmbed, trunc_normal_
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from backbone.config import AdaPerceiverConfig
from backbone.errors import ProjectError
from backbone.layers import Attention, LatentBlock, init_weights, rope_tables

Width = float | Sequence[float] | torch.Tensor
ReadKV = tuple[torch.Tensor, torch.Tensor]

class ImageError(ProjectError):
    """Images the backbone cannot take: the wrong shape, dtype or values."""


@dataclass
class GlanceState:
    """What a glance pass leaves for ``AdaPerceiver.extend`` to continue from.

    The glance is a stage of every larger configuration, not an overhead: the read's output and
    (at the same width) the first blocks' latents of its rows are those of any larger pass.
    """

    config: tuple[int, int, float]
    """``(tokens, depth, width)`` of the glance, resolved."""
    latents: list[torch.Tensor]
    """``latents[b]``: ``(B, tokens, D)`` after the read (``b = 0``) and after block ``b`` (``1..depth``)."""
    read_kv: ReadKV
    """The read's keys and values of the input tokens, shared by every configuration."""


def patch_embedding(config: AdaPerceiverConfig) -> nn.Module:
    """Images ``(B, C, H, W)`` -> input tokens ``(B, P, D)``: linear patches, or a conv stem."""
    c = config
    if not c.stem_channels:
        return PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
    # Early convolutions (Xiao et al., 2021): 3x3 stride-2 convs down to the patch grid, then a
    # 1x1 projection; each token then carries nonlinear features of its neighbourhood.
    n = len(c.stem_channels)
    stem = ConvStem(
        c.in_chans, depth=n + 1, channels=(*c.stem_channels, c.embed_dim),
        kernel_size=(3,) * n + (1,), stride=(2,) * n + (1,),
    )
    return HybridEmbed(stem, img_size=c.img_size, patch_size=1, in_chans=c.in_chans, embed_dim=c.embed_dim, proj=False)


class AdaPerceiver(nn.Module):
    """Perceiver-style classifier that runs at any configuration of its grid without retraining.

    A configuration is ``(tokens, depth, width)``: ``tokens`` one of ``token_grans``,
    ``depth`` in ``1..L``, ``width`` one of ``ffn_widths``. It is always an argument,
    never state. Any of them left as ``None`` means the largest.
    """

    def __init__(self, config: AdaPerceiverConfig) -> None:
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.patch_embed = patch_embedding(c)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, d))
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.read_norm_q = nn.LayerNorm(d)
        self.read_norm_kv = nn.LayerNorm(d)
        self.read = Attention(d, c.num_heads)
        rates = [c.drop_path * i / max(1, c.depth - 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            LatentBlock(d, c.num_heads, c.ffn_hidden, c.layerscale_init, rate) for rate in rates
        )
        self.write_query = nn.Parameter(torch.zeros(1, 1, d))
        self.write_norm_kv = nn.LayerNorm(d)
        self.write = Attention(d, c.num_heads)
        self.head_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, c.num_classes)

        cos, sin = rope_tables(c.max_tokens, d // c.num_heads, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # block(i) = index of the first granularity above latent i; query i sees key j iff block(j) <= block(i)
        block_of = torch.bucketize(torch.arange(c.max_tokens), torch.tensor(c.token_grans), right=True)
        self.register_buffer("block_mask", block_of[None, :] <= block_of[:, None], persistent=False)

        self.apply(init_weights)
        for p in (self.pos_embed, self.latent, self.write_query):
            trunc_normal_(p, std=0.02)

    # ---- validation -------------------------------------------------------------------
    def resolve(self, tokens: int | None, depth: int | None, width: float | None) -> tuple[int, int, float]:
        """Fill ``None`` with the largest value and check each against the grid (``ValueError``)."""
        c = self.config
        tokens = c.max_tokens if tokens is None else int(tokens)
        depth = c.depth if depth is None else depth
        width = 1.0 if width is None else float(width)
        c.token_index(tokens)
        c.check_depth(int(depth) if isinstance(depth, int) else depth)
        c.width_index(width)
        return tokens, int(depth), c.ffn_widths[c.width_index(width)]

    def check_images(self, x: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_chans, c.img_size, c.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ImageError(f"images must have shape (B, {', '.join(map(str, expected))}) for this backbone, got "
                             f"{tuple(x.shape)}; resize them (a folder of PNG/JPEG files is resized on reading)")

    # ---- the three stages ---------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Input tokens ``(B, P, D)`` of images ``(B, C, H, W)``; independent of the configuration."""
        self.check_images(x)
        return self.patch_embed(x) + self.pos_embed

    def _rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[:n], self.rope_sin[:n]

    def read_kv(self, input_tokens: torch.Tensor) -> ReadKV:
        """The read's keys and values of input tokens ``(B, P, D)``, each ``(B, heads, P, head_dim)``.

        They do not depend on the configuration, so several passes over the same inputs
        (the policy's glance, then the chosen configuration) can share them.
        """
        k, v = self.read.project_kv(self.read_norm_kv(input_tokens))
        # contiguous once here: each use of the permuted views would otherwise copy them again
        return k.contiguous(), v.contiguous()

    def read_latents(
        self, input_tokens: torch.Tensor | None, tokens: int, read_kv: ReadKV | None = None, start: int = 0
    ) -> torch.Tensor:
        """Latents ``start..tokens-1`` ``(B, tokens - start, D)`` after the read of input tokens ``(B, P, D)``.

        ``read_kv`` (from ``read_kv``), when given, stands in for ``input_tokens`` (then ``None``). Each latent
        query reads on its own, so rows ``start:`` are those of the full read. ``tokens`` is not checked
        against the grid (``resolve`` does that).
        """
        kv = self.read_kv(input_tokens) if read_kv is None else read_kv
        latents = self.latent.expand(kv[0].shape[0], tokens - start, -1)
        cos, sin = self._rope(tokens)
        return latents + self.read(self.read_norm_q(latents), kv=kv, rope_q=(cos[start:], sin[start:]))

    def write_logits(self, latents: torch.Tensor, grans: Sequence[int], row_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, len(grans), C)`` of latents ``(B, N, D)``: the write and head over the first ``g`` for each ``g``.

        ``row_tokens`` ``(B,)`` (with one ``g``): input ``i`` reads only its first ``row_tokens[i]`` latents.
        """
        n = max(grans)
        latents = latents[:, :n]
        queries = self.write_query.expand(latents.shape[0], len(grans), -1)
        mask = None
        if row_tokens is not None:
            mask = (torch.arange(n, device=latents.device)[None, :] < row_tokens[:, None])[:, None, None, :]
        elif any(g != n for g in grans):
            mask = torch.arange(n, device=latents.device)[None, :] < torch.tensor(grans, device=latents.device)[:, None]
        out = queries + self.write(queries, self.write_norm_kv(latents), rope_k=self._rope(n), mask=mask)
        return self.head(self.head_norm(out))

    def _hidden_mask(self, width: Width, batch: int, device: torch.device) -> torch.Tensor | None:
        """``None`` for one shared width, else a ``(B, H)`` mask for per-sample widths."""
        if isinstance(width, (int, float)):
            return None
        widths = torch.as_tensor(width, dtype=torch.float32, device=device).reshape(-1)
        if widths.numel() != batch:
            raise ValueError(f"per-sample width needs {batch} values, got {widths.numel()}")
        for w in widths.unique().tolist():
            self.config.width_index(w)
        units = torch.round(widths * self.config.ffn_hidden).clamp(min=1)
        return torch.arange(self.config.ffn_hidden, device=device)[None, :] < units[:, None]

    # ---- public API -------------------------------------------------------------------
    def run(
        self,
        input_tokens: torch.Tensor,
        tokens: int | None = None,
        depth: int | None = None,
        width: float | None = None,
        read_kv: ReadKV | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, C)`` from input tokens ``(B, P, D)`` at one configuration, sliced FFN weights.

        ``read_kv`` (from ``read_kv(input_tokens)``) skips recomputing the read's keys and values.
        """
        return self._pass(input_tokens, self.resolve(tokens, depth, width), read_kv, keep=False)[0]

    def glance(
        self,
        input_tokens: torch.Tensor | None,
        tokens: int | None = None,
        depth: int | None = None,
        width: float | None = None,
        read_kv: ReadKV | None = None,
    ) -> tuple[torch.Tensor, GlanceState]:
        """Logits ``(B, C)`` at the glance configuration, and the state ``extend()`` continues from.

        The same pass, numbers and FLOPs as ``run``; it also keeps the latents after the read
        and after each block (``None`` means the largest value, as for ``run``; callers name the
        glance's configuration, typically the smallest grid point).
        """
        config = self.resolve(tokens, depth, width)
        logits, latents, kv = self._pass(input_tokens, config, read_kv, keep=True)
        return logits, GlanceState(config, latents, kv)

    def extend(
        self,
        state: GlanceState,
        tokens: int | None = None,
        depth: int | None = None,
        width: float | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B', C)`` at ``(tokens, depth, width)`` for the inputs ``rows`` of the glance's batch (all if None).

        The reference continuation: one configuration, written to be read. ``extend_exits``, the fast path,
        must give row for row what this gives at each row's own configuration (``tests/test_glance_reuse.py``);
        a change to either is checked against the other.

        Equal to ``run(input_tokens, tokens, depth, width)`` up to float noise, reusing the glance
        wherever the block mask's prefix property allows (glance ``(g0, l0, w0)``, target ``(g, l, w)``):

        - the read: the glance's rows ``:g0`` serve every target; only rows ``g0:g`` are read;
        - blocks ``1..min(l, l0)`` at the same FFN width: rows ``:g0`` are the glance's latents, and
          only the new rows ``g0:g`` are computed (their queries, output projection and FFN; the
          keys and values of all ``g`` rows, recomputed from the glance's block inputs). With
          ``g <= g0`` nothing is computed there;
        - later blocks, or every block at another width: the full block over all ``g`` rows;
        - the write and head over the final ``g`` latents.

        ``backbone.flops.extension_flops`` counts exactly this. At the glance's own configuration
        this reruns the write over the stored latents, but a caller answers with the glance's
        logits there instead, so ``extension_flops`` is 0 for that point.
        """
        g, depth, width = self.resolve(tokens, depth, width)
        g0, l0, w0 = state.config
        hidden = self.config.ffn_hidden_units(width)
        # rows :g0 after block b are the glance's only at the same FFN width
        reused = min(depth, l0) if hidden == self.config.ffn_hidden_units(w0) else 0
        stored = state.latents[: reused + 1]
        kv = state.read_kv
        if rows is not None:
            stored = [z[rows] for z in stored]
            kv = (kv[0][rows], kv[1][rows])
        rope, mask = self._rope(g), self.block_mask[:g, :g]
        if g <= g0:
            latents = stored[reused][:, :g]
        else:
            new = self.read_latents(None, g, kv, start=g0)
            for b in range(reused):
                new = self.blocks[b].forward_rows(torch.cat([stored[b], new], dim=1), g0, rope, mask, hidden)
            latents = torch.cat([stored[reused], new], dim=1)
        for block in self.blocks[reused:depth]:
            latents = block(latents, rope, mask, hidden_units=hidden)
        return self.write_logits(latents, (g,))[:, 0]

    def extend_exits(
        self,
        state: GlanceState,
        tokens: int | None,
        width: float | None,
        rows_at_depth: Sequence[torch.Tensor],
        tokens_at_depth: Sequence[torch.Tensor] | None = None,
        hidden_at_depth: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``extend`` for inputs at one ``(tokens, width)`` and several exit depths, their shared blocks run once.

        The fast continuation; ``extend`` is its reference: each row's logits must equal (within 1e-5 in
        float32) ``extend`` at that row's own ``(tokens, depth, width)`` (``tests/test_glance_reuse.py``).

        ``rows_at_depth[d - 1]``: the glance's rows ``(n_d,)`` (int64, possibly empty) to extend to
        ``(tokens, d, width)``. Returns their logits ``(sum n_d, C)`` in the order of
        ``torch.cat(rows_at_depth)``, each equal to ``extend(state, tokens, d, width, rows)`` up to float
        noise, at the same FLOPs: an input leaves after its own exit depth. One pass instead of one per
        depth means fewer, larger operator calls, which is what a CPU pays for at small row counts.

        Inputs of fewer tokens or a narrower width can share the pass: ``tokens_at_depth[d - 1]`` and
        ``hidden_at_depth[d - 1]`` ``(n_d,)`` (int64) give each row's own token count (at most ``tokens``) and
        FFN hidden units (at most ``width``'s). Its logits are then those of its own configuration: by the
        block mask's prefix property its first latents never see the others, the write reads only its own,
        and its hidden units beyond its width are masked to zero. The pass then does more arithmetic than
        those inputs' configurations count (the larger token count, the larger width, and with several widths
        no reuse of the glance's blocks), in fewer operator calls.
        """
        g, depth, width = self.resolve(tokens, len(rows_at_depth), width)
        g0, l0, w0 = state.config
        hidden = self.config.ffn_hidden_units(width)
        # rows :g0 after block b are the glance's only at the same FFN width
        same_width = hidden == self.config.ffn_hidden_units(w0) and hidden_at_depth is None
        reused = min(depth, l0) if same_width else 0
        # deepest first, so that the inputs still running after each block are a prefix of the batch
        order = torch.cat(list(rows_at_depth)[::-1])
        row_tokens = None if tokens_at_depth is None else torch.cat(list(tokens_at_depth)[::-1])
        hidden_mask = None
        if hidden_at_depth is not None:
            units = torch.cat(list(hidden_at_depth)[::-1])
            hidden_mask = torch.arange(hidden, device=units.device)[None, :] < units[:, None]
        sizes = [rows.shape[0] for rows in rows_at_depth]
        running = [sum(sizes[b:]) for b in range(depth)] + [0]  # running[b]: inputs that run block b + 1
        stored = [z[order] for z in state.latents[: reused + 1]]
        rope, mask = self._rope(g), self.block_mask[:g, :g]
        if g <= g0:
            latents = stored[0][:, :g]
        else:
            new = self.read_latents(None, g, (state.read_kv[0][order], state.read_kv[1][order]), start=g0)
            latents = torch.cat([stored[0], new], dim=1)
        exits = []
        for b in range(depth):  # block b + 1
            latents = latents[: running[b]]
            if b < reused:  # rows :g0 after this block are the glance's; only rows g0:g are computed
                kept = stored[b + 1][: running[b], : min(g, g0)]
                if g > g0:
                    kept = torch.cat([kept, self.blocks[b].forward_rows(latents, g0, rope, mask, hidden)], dim=1)
                latents = kept
            else:
                masked = None if hidden_mask is None else hidden_mask[: running[b]]
                latents = self.blocks[b](latents, rope, mask, hidden_units=hidden, hidden_mask=masked)
            leaving = slice(running[b + 1], running[b])  # the inputs whose exit is b + 1
            exits.append(self.write_logits(latents[leaving], (g,), None if row_tokens is None else row_tokens[leaving])[:, 0])
        return torch.cat(exits)

    def _pass(
        self,
        input_tokens: torch.Tensor | None,
        config: tuple[int, int, float],
        read_kv: ReadKV | None,
        keep: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, ReadKV]:
        """One pass at a resolved ``config``: logits ``(B, C)``, the latents after the read and after
        each block (when ``keep``, else ``None``), and the read's keys and values."""
        tokens, depth, width = config
        hidden = self.config.ffn_hidden_units(width)
        rope, mask = self._rope(tokens), self.block_mask[:tokens, :tokens]
        kv = self.read_kv(input_tokens) if read_kv is None else read_kv
        latents = self.read_latents(None, tokens, kv)
        kept = [latents] if keep else None
        for block in self.blocks[:depth]:
            latents = block(latents, rope, mask, hidden_units=hidden)
            if keep:
                kept.append(latents)
        return self.write_logits(latents, (tokens,))[:, 0], kept, kv

    def run_mixed(
        self,
        input_tokens: torch.Tensor,
        configs: Sequence[tuple[int, int, float]],
        read_kv: ReadKV | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, C)`` of input tokens ``(B, P, D)``, input ``i`` at its own ``configs[i]`` (``backbone.packed``)."""
        # imported here: packed inference is built on this model's public stages, so backbone.packed imports
        # this module, never the other way round (a module-level import here would close the circle)
        from backbone.packed import run_mixed

        return run_mixed(self, input_tokens, configs, read_kv)

    def forward(
        self, x: torch.Tensor, tokens: int | None = None, depth: int | None = None, width: float | None = None
    ) -> torch.Tensor:
        """Logits ``(B, C)`` of images ``(B, C, H, W)`` at one configuration."""
        self.resolve(tokens, depth, width)
        return self.run(self.embed(x), tokens, depth, width)

    def forward_grid(self, x: torch.Tensor, width: Width = 1.0) -> torch.Tensor:
        """Logits ``(B, K, L, C)`` of every (token granularity, exit depth) from one pass.

        ``width`` is one FFN width, or one per sample (``(B,)``, applied by masking).
        """
        return self.run_grid(self.embed(x), width)

    def run_grid(self, input_tokens: torch.Tensor, width: Width = 1.0, read_kv: ReadKV | None = None) -> torch.Tensor:
        """``forward_grid`` from input tokens ``(B, P, D)`` (and optionally their ``read_kv``)."""
        c = self.config
        hidden_mask = self._hidden_mask(width, input_tokens.shape[0], input_tokens.device)
        hidden = None if hidden_mask is not None else c.ffn_hidden_units(float(width))
        n = c.max_tokens
        rope, mask = self._rope(n), self.block_mask
        latents = self.read_latents(input_tokens, n, read_kv)
        exits = []
        for block in self.blocks:
            latents = block(latents, rope, mask, hidden_units=hidden, hidden_mask=hidden_mask)
            exits.append(self.write_logits(latents, c.token_grans))
        return torch.stack(exits, dim=2)

    @torch.no_grad()
    def forward_early_exit(
        self, x: torch.Tensor, tau: float, tokens: int | None = None, width: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run until the max softmax probability reaches ``tau``; only unfinished inputs go on.

        Returns logits ``(B, C)`` and the exit depth of each input ``(B,)`` (1-based).
        """
        tokens, _, width = self.resolve(tokens, None, width)
        hidden = self.config.ffn_hidden_units(width)
        rope, mask = self._rope(tokens), self.block_mask[:tokens, :tokens]
        latents = self.read_latents(self.embed(x), tokens, None)
        logits = torch.zeros(x.shape[0], self.config.num_classes, device=x.device)
        exit_depth = torch.full((x.shape[0],), self.config.depth, dtype=torch.long, device=x.device)
        active = torch.arange(x.shape[0], device=x.device)
        for depth, block in enumerate(self.blocks, start=1):
            latents = block(latents, rope, mask, hidden_units=hidden)
            step_logits = self.write_logits(latents, (tokens,))[:, 0]
            done = step_logits.softmax(-1).amax(-1) >= tau
            if depth == self.config.depth:
                done = torch.ones_like(done)
            logits[active[done]] = step_logits[done].float()
            exit_depth[active[done]] = depth
            active, latents = active[~done], latents[~done]
            if active.numel() == 0:
                break
        return logits, exit_depth
