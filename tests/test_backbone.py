import dataclasses

import pytest
import torch

from backbone import AdaPerceiver, AdaPerceiverConfig, flops, measure_flops
from backbone.train import TrainConfig, TrainingForward, grid_loss_weights, training_loss


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_stem_model"])
def test_forward_grid_matches_forward_everywhere(model_fixture, tiny_config, request):
    tiny_model = request.getfixturevalue(model_fixture)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        for width in tiny_config.ffn_widths:
            grid = tiny_model.forward_grid(x, width)
            assert grid.shape == (5, 3, 3, 10)
            for k, tokens in enumerate(tiny_config.token_grans):
                for depth in range(1, tiny_config.depth + 1):
                    single = tiny_model(x, tokens=tokens, depth=depth, width=width)
                    assert (grid[:, k, depth - 1] - single).abs().max().item() <= 1e-4


def test_configurations_really_differ(tiny_model):
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        grid = tiny_model.forward_grid(x, 1.0)
        narrow = tiny_model.forward_grid(x, 0.25)
    assert (grid[:, 0, -1] - grid[:, -1, -1]).abs().max() > 1e-3
    assert (grid[:, -1, 0] - grid[:, -1, -1]).abs().max() > 1e-3
    assert (narrow - grid).abs().max() > 1e-3


def test_block_mask_prefix_property(tiny_model, tiny_config):
    torch.manual_seed(1)
    n = tiny_config.max_tokens
    rope = (tiny_model.rope_cos[:n], tiny_model.rope_sin[:n])
    latents = torch.randn(2, n, tiny_config.embed_dim)
    with torch.no_grad():
        for g in tiny_config.token_grans[:-1]:
            changed = latents.clone()
            changed[:, g:] = torch.randn_like(changed[:, g:]) * 5
            a, b = latents, changed
            for block in tiny_model.blocks:
                a = block(a, rope, tiny_model.block_mask)
                b = block(b, rope, tiny_model.block_mask)
                assert torch.allclose(a[:, :g], b[:, :g], atol=1e-5)
                assert not torch.allclose(a[:, g:], b[:, g:], atol=1e-3)


def test_per_sample_masked_width_equals_sliced_width(tiny_model, tiny_config):
    x = torch.rand(6, 1, 8, 8)
    widths = torch.tensor([0.25, 1.0, 0.5, 0.5, 0.25, 1.0])
    with torch.no_grad():
        mixed = tiny_model.forward_grid(x, widths)
        for i, w in enumerate(widths.tolist()):
            sliced = tiny_model.forward_grid(x[i : i + 1], w)
            assert (mixed[i] - sliced[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_stem_model"])
@pytest.mark.parametrize("config", [(2, 1, 0.25), (8, 3, 1.0), (4, 2, 0.5), (2, 3, 1.0), (8, 1, 0.25), (4, 3, 0.25)])
def test_flops_agree_with_torch_flop_counter(model_fixture, config, request):
    model = request.getfixturevalue(model_fixture)
    x = torch.rand(1, 1, 8, 8)
    counted = measure_flops(lambda: model(x, *config))
    analytic = flops(model.config, *config)
    assert counted > 0
    assert abs(analytic - counted) / counted <= 0.02


def test_conv_stem_costs_more_than_linear_patches(tiny_stem_model):
    stem = tiny_stem_model.config
    for config in [(2, 1, 0.25), (8, 3, 1.0)]:
        assert flops(stem, *config) > flops(dataclasses.replace(stem, stem_channels=()), *config)


def test_cpu_inference_attention_equals_training_kernel(tiny_model, tiny_config):
    # inference on CPU takes the matmul-softmax path, training takes torch's SDPA kernel
    x = torch.rand(5, 1, 8, 8)
    training_kernel = tiny_model.forward_grid(x, 0.5)
    with torch.inference_mode():
        inference_path = tiny_model.forward_grid(x, 0.5)
        counted = measure_flops(lambda: tiny_model(x[:1], 4, 2, 0.5))
    assert (training_kernel - inference_path).abs().max().item() <= 1e-5
    assert abs(flops(tiny_config, 4, 2, 0.5) - counted) / counted <= 0.02


@pytest.mark.parametrize("compiling", [False, True])
def test_cpu_attention_kernel_by_score_tile(monkeypatch, compiling):
    # eager CPU inference always attends by matmul-softmax; compiled graphs only for small score tiles (measured)
    from backbone.layers import matmul_softmax_on_cpu

    # (queries, keys): the glance's read and block, its write over 4 latents; 32 latents, one query over 32
    small = [(4, 49), (4, 4), (1, 4), (16, 16)]
    large = [(8, 49), (16, 49), (32, 32), (32, 49), (1, 32), (1, 8)]
    assert all(matmul_softmax_on_cpu(q, k, compiled=compiling) for q, k in small)
    assert all(matmul_softmax_on_cpu(q, k, compiled=compiling) is not compiling for q, k in large)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)  # by default it asks torch
    assert matmul_softmax_on_cpu(32, 32) is not compiling


def test_flop_counter_sees_attention(tiny_model):
    # without the registered CPU SDPA formula, attention would count as 0 FLOPs
    from torch.utils.flop_counter import FlopCounterMode

    measure_flops(lambda: None)  # registers the formula
    x = torch.rand(1, 1, 8, 8)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        tiny_model(x, 8, 3, 1.0)
    sdpa = {str(op): n for op, n in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op)}
    assert sdpa and all(n > 0 for n in sdpa.values()), "attention FLOPs were not counted"


def test_flops_grow_along_each_axis(tiny_config):
    assert flops(tiny_config, 2, 3, 1.0) < flops(tiny_config, 4, 3, 1.0) < flops(tiny_config, 8, 3, 1.0)
    assert flops(tiny_config, 8, 1, 1.0) < flops(tiny_config, 8, 2, 1.0) < flops(tiny_config, 8, 3, 1.0)
    assert flops(tiny_config, 8, 3, 0.25) < flops(tiny_config, 8, 3, 0.5) < flops(tiny_config, 8, 3, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens": 3}, r"allowed: \[2, 4, 8\]"),
        ({"depth": 0}, r"outside 1..3"),
        ({"depth": 4}, r"outside 1..3"),
        ({"width": 0.75}, r"allowed: \[0.25, 0.5, 1.0\]"),
    ],
)
def test_bad_configuration_raises(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.rand(1, 1, 8, 8), **kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 9, 9), (1, 3, 8, 8), (1, 8, 8)])
def test_bad_image_shape_raises(tiny_model, shape):
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 8, 8\)"):
        tiny_model(torch.rand(*shape))


def test_bad_architecture_raises():
    with pytest.raises(ValueError, match="token_grans"):
        AdaPerceiverConfig(token_grans=(4, 2))
    with pytest.raises(ValueError, match="patch_size"):
        AdaPerceiverConfig(img_size=9, patch_size=2)
    with pytest.raises(ValueError, match=r"stem_channels \(8, 16\) needs .* patch_size == 2 \*\* 2"):
        AdaPerceiverConfig(img_size=8, patch_size=2, stem_channels=(8, 16))


def test_early_exit(tiny_model, tiny_config):
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        logits, depth = tiny_model.forward_early_exit(x, tau=0.0)
        assert (depth == 1).all()
        assert torch.allclose(logits, tiny_model(x, depth=1), atol=1e-5)
        logits, depth = tiny_model.forward_early_exit(x, tau=1.01)
        assert (depth == tiny_config.depth).all()
        assert torch.allclose(logits, tiny_model(x), atol=1e-5)
        # an intermediate tau: every input leaves at its first confident depth
        grid = tiny_model.forward_grid(x)[:, -1].softmax(-1).amax(-1)  # (B, L)
        tau = grid.median().item()
        logits, depth = tiny_model.forward_early_exit(x, tau=tau)
        for i in range(len(x)):
            confident = (grid[i] >= tau).nonzero()
            expected = int(confident[0]) + 1 if len(confident) else tiny_config.depth
            assert depth[i].item() == expected
            assert torch.allclose(logits[i], tiny_model(x[i : i + 1], depth=expected)[0], atol=1e-5)


@pytest.mark.parametrize("stem_channels", [(), (4,)])
def test_grid_objective_trains_every_parameter(tiny_config, stem_channels):
    model = AdaPerceiver(dataclasses.replace(tiny_config, stem_channels=stem_channels)).train()
    train = TrainConfig()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = training_loss(TrainingForward(model, 'grid'), x, y, torch.tensor([0.25, 0.5, 1.0, 1.0] * 2), grid_loss_weights(tiny_config, train), train)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grid_loss_weights_favour_deeper_and_larger(tiny_config):
    w = grid_loss_weights(tiny_config, TrainConfig())
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert (w[:, 1:] > w[:, :-1]).all() and (w[1:, :] > w[:-1, :]).all()


def test_public_stages_compose_to_forward(tiny_model, tiny_config):
    # embed -> read_kv -> read_latents -> blocks -> write_logits is the pass that forward runs
    x = torch.rand(3, 1, 8, 8)
    tokens, depth, width = 4, 2, 0.5
    rope, mask = (tiny_model.rope_cos[:tokens], tiny_model.rope_sin[:tokens]), tiny_model.block_mask[:tokens, :tokens]
    with torch.inference_mode():
        input_tokens = tiny_model.embed(x)
        latents = tiny_model.read_latents(None, tokens, tiny_model.read_kv(input_tokens))
        assert latents.shape == (3, tokens, tiny_config.embed_dim)
        # each latent query reads on its own: rows start: are those of the full read
        assert torch.allclose(tiny_model.read_latents(input_tokens, tokens, start=2), latents[:, 2:], atol=1e-6)
        for block in tiny_model.blocks[:depth]:
            latents = block(latents, rope, mask, hidden_units=tiny_config.ffn_hidden_units(width))
        logits = tiny_model.write_logits(latents, (2, tokens))
        assert logits.shape == (3, 2, tiny_config.num_classes)
        assert (logits[:, 1] - tiny_model(x, tokens, depth, width)).abs().max().item() <= 1e-5
        # row_tokens: each input writes from its own first latents
        row_tokens = torch.tensor([2, tokens, 2])
        assert torch.allclose(tiny_model.write_logits(latents, (tokens,), row_tokens)[:, 0], logits[[0, 1, 2], [0, 1, 0]],
                              atol=1e-5)


def test_model_does_not_import_packed_at_module_level():
    # backbone.packed builds on the model's public stages; model.py imports it only inside run_mixed
    import ast
    import inspect

    import backbone.model

    tree = ast.parse(inspect.getsource(backbone.model))
    imported = [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    assert "backbone.packed" not in imported
