"""Which inputs the glance answers, and the extension passes that answer the others: pure Python, no tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backbone.grid import GridPoint


@dataclass(frozen=True)
class ExtensionPass:
    """One call of ``AdaPerceiver.extend_exits``: inputs continued from the glance at one (tokens, width), each
    leaving at its own exit depth."""

    tokens: int
    """Latent tokens of the pass: the most any of its inputs has."""
    width: float
    """FFN width of the pass: the widest of its inputs'."""
    rows_at_depth: tuple[tuple[int, ...], ...]
    """``rows_at_depth[d - 1]``: the batch rows that leave after block ``d`` (possibly none), up to the deepest."""
    row_tokens: tuple[tuple[int, ...], ...] | None = None
    """Each row's own token count, laid out as ``rows_at_depth``; None when every row has the pass's."""
    row_widths: tuple[tuple[float, ...], ...] | None = None
    """Each row's own FFN width, laid out as ``rows_at_depth``; None when every row has the pass's."""

    @property
    def depth(self) -> int:
        """The deepest exit: the blocks the pass runs."""
        return len(self.rows_at_depth)

    @property
    def rows(self) -> list[int]:
        """The pass's rows in the order its logits come back (by exit depth, then batch order)."""
        return [i for rows in self.rows_at_depth for i in rows]


@dataclass(frozen=True)
class ExtensionPlan:
    """How one batch is answered after the glance."""

    answered: tuple[int, ...]
    """Rows whose configuration is the glance's own: its logits answer them."""
    passes: tuple[ExtensionPass, ...]
    """The extension passes of every other row; each row is in exactly one."""


def plan_extensions(configs: Sequence[GridPoint], glance: GridPoint, merge: bool = False) -> ExtensionPlan:
    """The plan for inputs of ``configs`` after a glance at ``glance``.

    Not merged: one pass per (tokens, width), whose arithmetic is exactly the configurations' FLOPs. Merged: one
    pass per token count, at the widest of its inputs' widths, and inputs at the glance's token count join the
    next larger token count's pass where there is one; each input still gets its own configuration's logits
    (per-row token counts and widths), in fewer, larger operator calls but with arithmetic beyond the
    configurations' FLOPs (on a CPU a pass costs a fixed ~0.5 ms at a few rows, which merging saves).
    """
    configs = [GridPoint(*c) for c in configs]
    glance = GridPoint(*glance)
    answered, groups = [], {}
    for i, cfg in enumerate(configs):
        if cfg == glance:
            answered.append(i)
        else:
            groups.setdefault(cfg.tokens if merge else (cfg.tokens, cfg.width), []).append(i)
    if merge:
        larger = sorted(t for t in groups if t > glance.tokens)
        if glance.tokens in groups and larger:
            groups[larger[0]] += groups.pop(glance.tokens)
    passes = []
    for inputs in groups.values():
        tokens, width = max(configs[i].tokens for i in inputs), max(configs[i].width for i in inputs)
        deepest = max(configs[i].depth for i in inputs)
        rows = tuple(tuple(i for i in inputs if configs[i].depth == d) for d in range(1, deepest + 1))

        def per_row(value, rows=rows):
            return tuple(tuple(value(configs[i]) for i in at_depth) for at_depth in rows)

        passes.append(ExtensionPass(
            tokens, width, rows,
            None if all(configs[i].tokens == tokens for i in inputs) else per_row(lambda c: c.tokens),
            None if all(configs[i].width == width for i in inputs) else per_row(lambda c: c.width)))
    return ExtensionPlan(tuple(answered), tuple(passes))


def padded(extension: ExtensionPass) -> ExtensionPass:
    """``extension`` with each depth's rows padded at its end to the next power of two by repeating its first row
    (empty depths stay empty), so that a runner of fixed shapes needs a few programs, not one per row count; the
    padded pass's logits give each depth's real rows first, then its padding."""

    def pad(at_depth: tuple) -> tuple:
        n = len(at_depth)
        size = 1 << (n - 1).bit_length() if n else 0
        return at_depth + at_depth[:1] * (size - n)

    def each(layout):
        return None if layout is None else tuple(pad(at_depth) for at_depth in layout)

    return ExtensionPass(extension.tokens, extension.width, each(extension.rows_at_depth), each(extension.row_tokens),
                         each(extension.row_widths))
