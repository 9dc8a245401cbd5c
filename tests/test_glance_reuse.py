"""The glance is a stage, not an overhead: extend() reuses its latents and costs extension_flops."""

import itertools

import pytest
import torch

from backbone import cascade_flops, extension_flops, flops, flops_grid, input_adapter_flops, measure_flops


def grid_points(config):
    return list(itertools.product(config.token_grans, range(1, config.depth + 1), config.ffn_widths))


@pytest.fixture
def inputs(tiny_model):
    torch.manual_seed(3)
    with torch.inference_mode():
        input_tokens = tiny_model.embed(torch.rand(5, 1, 8, 8))
    return input_tokens


@pytest.mark.parametrize("glance", [(2, 1, 0.25), (2, 2, 0.25), (4, 2, 0.5)])
def test_extend_equals_run_everywhere(tiny_model, tiny_config, inputs, glance):
    rows = torch.tensor([4, 1, 3])
    with torch.inference_mode():
        glance_logits, state = tiny_model.glance(inputs, *glance)
        assert state.config == glance and len(state.latents) == glance[1] + 1
        assert (glance_logits - tiny_model.run(inputs, *glance)).abs().max().item() <= 1e-5
        for target in grid_points(tiny_config):
            full = tiny_model.run(inputs, *target)
            assert (tiny_model.extend(state, *target) - full).abs().max().item() <= 1e-5, target
            assert (tiny_model.extend(state, *target, rows=rows) - full[rows]).abs().max().item() <= 1e-5, target
        mask = torch.tensor([True, False, True, True, False])
        full = tiny_model.run(inputs, 8, 3, 1.0)
        assert (tiny_model.extend(state, rows=mask) - full[mask]).abs().max().item() <= 1e-5


def test_glance_shares_the_input_adapter(tiny_model, tiny_config, inputs):
    # with the read's keys and values passed in, the glance pays exactly flops() less the input adapter
    with torch.inference_mode():
        read_kv = tiny_model.read_kv(inputs)
        for glance in [(2, 1, 0.25), (4, 2, 0.5), (8, 3, 1.0)]:
            counted = measure_flops(lambda glance=glance: tiny_model.glance(inputs, *glance, read_kv=read_kv))
            assert counted == len(inputs) * (flops(tiny_config, *glance) - input_adapter_flops(tiny_config))
            # and run() counts the same as glance()
            assert counted == measure_flops(lambda glance=glance: tiny_model.run(inputs, *glance, read_kv=read_kv))


TARGETS = [
    (4, 1, 0.25),  # same width, more tokens, within the glance's depth
    (8, 3, 0.25),  # same width, more tokens and deeper
    (2, 3, 0.25),  # deeper only
    (8, 3, 1.0),  # another width
    (4, 2, 0.5),  # another width, more tokens
    (2, 1, 0.25),  # fewer tokens, shallower, same width: the write alone
    (2, 2, 1.0),  # fewer tokens, another width
]


@pytest.mark.parametrize("glance", [(2, 1, 0.25), (2, 2, 0.25), (4, 2, 0.25)])
@pytest.mark.parametrize("target", TARGETS)
def test_extension_flops_are_what_extend_computes(tiny_model, tiny_config, inputs, glance, target):
    if target == glance:  # answered by the glance's logits
        assert extension_flops(tiny_config, glance, target) == 0
        return
    with torch.inference_mode():
        _, state = tiny_model.glance(inputs, *glance)
        counted = measure_flops(lambda: tiny_model.extend(state, *target))
        assert counted == len(inputs) * extension_flops(tiny_config, glance, target)
        rows = torch.tensor([0, 2])
        counted = measure_flops(lambda: tiny_model.extend(state, *target, rows=rows))
        assert counted == len(rows) * extension_flops(tiny_config, glance, target)


@pytest.mark.parametrize("glance", [(2, 1, 0.25), (2, 2, 0.25)])
def test_extension_reuses_the_glance(tiny_model, tiny_config, inputs, glance):
    g0, l0, w0 = glance
    c, shared = tiny_config, input_adapter_flops(tiny_config)

    def read_rows(n):  # the read's query and output projections and attention for n latents
        return 4 * n * c.embed_dim**2 + 4 * n * c.num_patches * c.embed_dim

    with torch.inference_mode():
        _, state = tiny_model.glance(inputs, *glance)
        for target in [(g0, l0 + 1, w0), (4, l0, w0), (8, 3, w0)]:
            counted = measure_flops(lambda target=target: tiny_model.extend(state, *target)) // len(inputs)
            # less than the target alone even after reusing the glance's read: the blocks are reused too
            assert counted < flops(c, *target) - shared - read_rows(min(g0, target[0])), target
    # same width reuses the glance's blocks, another width only its read
    for g, l in [(2, 3), (4, l0), (8, 3)]:
        same = extension_flops(tiny_config, glance, (g, l, w0))
        other = extension_flops(tiny_config, glance, (g, l, 0.5))
        assert same < other < flops(tiny_config, g, l, 0.5) - shared, (g, l)
    assert extension_flops(tiny_config, glance, glance) == 0


def test_cascade_flops(tiny_config):
    glance = (2, 1, 0.25)
    cascade = cascade_flops(tiny_config, glance)
    assert cascade.shape == flops_grid(tiny_config).shape and cascade.dtype == torch.int64
    assert cascade[0, 0, 0] == flops(tiny_config, *glance)
    for k, l, m in itertools.product(*map(range, cascade.shape)):
        target = (tiny_config.token_grans[k], l + 1, tiny_config.ffn_widths[m])
        assert cascade[k, l, m] == flops(tiny_config, *glance) + extension_flops(tiny_config, glance, target)
    # a cascade costs no more than the glance plus the target alone, minus the shared input adapter
    alone = flops_grid(tiny_config) + flops(tiny_config, *glance) - input_adapter_flops(tiny_config)
    assert (cascade <= alone).all()


@pytest.mark.parametrize("glance", [(2, 1, 0.25), (2, 2, 0.25), (4, 2, 0.5)])
def test_extend_exits_equals_extend_per_depth(tiny_model, tiny_config, inputs, glance):
    # rows_at_depth[d - 1]: the rows that leave after block d; some depths empty, rows in any order
    rows_at_depth = [torch.tensor([3]), torch.tensor([], dtype=torch.long), torch.tensor([0, 4, 1])]
    with torch.inference_mode():
        _, state = tiny_model.glance(inputs, *glance)
        for tokens, width in itertools.product(tiny_config.token_grans, tiny_config.ffn_widths):
            for depth in range(1, tiny_config.depth + 1):
                parts = rows_at_depth[:depth]
                out = tiny_model.extend_exits(state, tokens, width, parts)
                expected = [tiny_model.extend(state, tokens, d, width, rows=rows)
                            for d, rows in enumerate(parts, start=1) if len(rows)]
                assert (out - torch.cat(expected)).abs().max().item() <= 1e-5, (tokens, depth, width)
                # an input pays its own exit depth's extension, no more
                paid = sum(len(rows) * extension_flops(tiny_config, glance, (tokens, d, width))
                           for d, rows in enumerate(parts, start=1) if (tokens, d, width) != glance)
                if (tokens, width) != (glance[0], glance[2]):
                    counted = measure_flops(lambda t=tokens, w=width, p=parts: tiny_model.extend_exits(state, t, w, p))
                    assert counted == paid, (tokens, depth, width)
        none = [torch.tensor([], dtype=torch.long)] * 2
        assert tiny_model.extend_exits(state, 8, 1.0, none).shape == (0, 10)


@pytest.mark.parametrize("glance", [(2, 1, 0.25), (4, 2, 0.5)])
def test_extend_exits_of_mixed_tokens_and_widths_gives_each_input_its_own_configuration(tiny_model, tiny_config,
                                                                                        inputs, glance):
    # one pass at (8, 1.0): each row at its own (tokens, depth, width), all no larger than the pass's
    rows_at_depth = [torch.tensor([3, 1]), torch.tensor([], dtype=torch.long), torch.tensor([0, 4, 2])]
    per_row = {3: (2, 0.25), 1: (8, 1.0), 0: (4, 0.5), 4: (8, 0.25), 2: (2, 1.0)}
    h = tiny_config.ffn_hidden_units
    tokens_at_depth = [torch.tensor([per_row[r][0] for r in rows.tolist()], dtype=torch.long) for rows in rows_at_depth]
    hidden_at_depth = [torch.tensor([h(per_row[r][1]) for r in rows.tolist()], dtype=torch.long) for rows in rows_at_depth]
    with torch.inference_mode():
        _, state = tiny_model.glance(inputs, *glance)
        out = tiny_model.extend_exits(state, 8, 1.0, rows_at_depth, tokens_at_depth, hidden_at_depth)
        expected = torch.cat([tiny_model.extend(state, per_row[r][0], d, per_row[r][1], rows=torch.tensor([r]))
                              for d, rows in enumerate(rows_at_depth, start=1) for r in rows.tolist()])
        assert (out - expected).abs().max().item() <= 1e-5
        # only the token counts differ (the pass at the glance's width reuses its blocks), or only the widths
        same_width = [torch.full_like(t, h(glance[2])) for t in hidden_at_depth]
        tokens_only = tiny_model.extend_exits(state, 8, glance[2], rows_at_depth, tokens_at_depth)
        expected = torch.cat([tiny_model.extend(state, per_row[r][0], d, glance[2], rows=torch.tensor([r]))
                              for d, rows in enumerate(rows_at_depth, start=1) for r in rows.tolist()])
        assert (tokens_only - expected).abs().max().item() <= 1e-5
        widths_only = tiny_model.extend_exits(state, 8, glance[2], rows_at_depth, None, same_width)
        assert (widths_only - tiny_model.extend_exits(state, 8, glance[2], rows_at_depth)).abs().max().item() <= 1e-5
        # at the glance's width with narrower rows among them, the glance's blocks are not theirs to reuse
        narrower = [w for w in tiny_config.ffn_widths if w < glance[2]]
        if narrower:
            widths = {r: narrower[0] if r % 2 else glance[2] for r in per_row}
            mixed = tiny_model.extend_exits(state, 8, glance[2], rows_at_depth, None,
                                            [torch.tensor([h(widths[r]) for r in rows.tolist()], dtype=torch.long)
                                             for rows in rows_at_depth])
            expected = torch.cat([tiny_model.extend(state, 8, d, widths[r], rows=torch.tensor([r]))
                                  for d, rows in enumerate(rows_at_depth, start=1) for r in rows.tolist()])
            assert (mixed - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("per_row", ["tokens", "tokens and widths", "tokens and narrower widths"])
@pytest.mark.parametrize("glance", [(2, 1, 0.25), (4, 2, 0.5), (2, 2, 1.0)])
def test_extend_is_the_reference_of_extend_exits_row_for_row(tiny_model, tiny_config, glance, per_row, seed):
    # every row at a random (tokens, depth, width) of its own, all in one extend_exits pass; each row's logits are
    # extend's at that row's configuration. Per-row tokens alone, at the glance's width, take the path that reuses
    # the glance's blocks; per-row widths the one that masks hidden units, also at the glance's width, where
    # the narrower rows must not reuse them.
    c, n = tiny_config, 12
    gen = torch.Generator().manual_seed(seed)

    def pick(values):  # one value per row
        return [values[i] for i in torch.randint(len(values), (n,), generator=gen).tolist()]

    tokens, depths = pick(c.token_grans), pick(range(1, c.depth + 1))
    widths = {"tokens": [glance[2]] * n, "tokens and widths": pick(c.ffn_widths),
              "tokens and narrower widths": pick([w for w in c.ffn_widths if w <= glance[2]])}[per_row]
    width = glance[2] if per_row != "tokens and widths" else max(widths)  # the pass's
    assert len(set(depths)) > 1 and len(set(tokens)) > 1
    order = torch.randperm(n, generator=gen)  # rows in any order within an exit depth
    rows_at_depth = [order[[depths[r] == d for r in order.tolist()]] for d in range(1, c.depth + 1)]
    tokens_at_depth = [torch.tensor([tokens[r] for r in rows.tolist()], dtype=torch.long) for rows in rows_at_depth]
    hidden_at_depth = None
    if per_row != "tokens":
        hidden_at_depth = [torch.tensor([c.ffn_hidden_units(widths[r]) for r in rows.tolist()], dtype=torch.long)
                           for rows in rows_at_depth]
    with torch.inference_mode():
        _, state = tiny_model.glance(tiny_model.embed(torch.rand(n, 1, 8, 8, generator=gen)), *glance)
        out = tiny_model.extend_exits(state, max(tokens), width, rows_at_depth, tokens_at_depth, hidden_at_depth)
        assert out.shape == (n, c.num_classes)
        for logits, r in zip(out, torch.cat(rows_at_depth).tolist(), strict=True):
            own = (tokens[r], depths[r], widths[r])
            reference = tiny_model.extend(state, *own, rows=torch.tensor([r]))[0]
            assert (logits - reference).abs().max().item() <= 1e-5, (r, own)
