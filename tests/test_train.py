import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import backbone.train as train_module
from backbone import AdaPerceiver
from backbone.data import load_dataset
from backbone.train import (
    TrainConfig,
    TrainingForward,
    augment,
    grid_loss_weights,
    mixup,
    train_backbone,
    training_loss,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_resume_after_a_kill_gives_the_same_model(tiny_config, digits, tmp_path, monkeypatch):
    recipe = TrainConfig(epochs=2, batch_size=256, warmup_epochs=0.5, eval_limit=64, mixup_alpha=0.2)
    train_backbone(tiny_config, recipe, digits, tmp_path / "straight", resume=False)

    real_eval, calls = train_module.grid_accuracy, []

    def killed_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after epoch 2, before its state is saved
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train_module, "grid_accuracy", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_backbone(tiny_config, recipe, digits, tmp_path / "resumed", resume=True)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(train_module, "grid_accuracy", real_eval)
    train_backbone(tiny_config, recipe, digits, tmp_path / "resumed", resume=True)

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert list((tmp_path / "straight" / "tb").glob("events.out.tfevents*")), "TensorBoard logs written"


def test_mixup_blends_inputs_and_labels_alike(tiny_config):
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    mixed, targets = mixup(x, y, 10, 0.4, torch.Generator().manual_seed(0))
    again, _ = mixup(x, y, 10, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again), "seeded"
    assert torch.allclose(targets.sum(1), torch.ones(16))
    # one lam for the batch; each image and its label are blended with the same partner and weight
    lam = next(targets[i, y[i]].item() for i in range(16) if targets[i].max() < 1)
    assert 0 < lam < 1
    onehot = torch.nn.functional.one_hot(y, 10).float()
    for i in range(16):
        assert any(torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)
                   and torch.allclose(targets[i], lam * onehot[i] + (1 - lam) * onehot[j], atol=1e-6)
                   for j in range(16)), i
    with pytest.raises(ValueError, match="mixup_alpha"):
        TrainConfig(mixup_alpha=-1)
    # soft one-hot targets give the same grid loss as class indices
    model, recipe = TrainingForward(AdaPerceiver(tiny_config), "grid"), TrainConfig()
    weights, widths = grid_loss_weights(tiny_config, recipe), torch.ones(16)
    hard = training_loss(model, x, y, widths, weights, recipe)
    soft = training_loss(model, x, torch.nn.functional.one_hot(y, 10).float(), widths, weights, recipe)
    assert torch.allclose(hard, soft, atol=1e-6)


def test_augment_shifts_whole_pixels():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = augment(x, 1, False, torch.Generator().manual_seed(0))
    for image in out:
        # every output is the input moved by at most one pixel, with zero fill
        matches = [torch.equal(image, torch.roll(x[0], (dy, dx), (1, 2)) * mask)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   for mask in [_shift_mask(dy, dx)]]
        assert any(matches)
    assert not all(torch.equal(o, x[0]) for o in out), "some inputs move"


def _shift_mask(dy: int, dx: int) -> torch.Tensor:
    mask = torch.ones(1, 4, 4)
    if dy > 0:
        mask[:, :dy] = 0
    if dy < 0:
        mask[:, dy:] = 0
    if dx > 0:
        mask[:, :, :dx] = 0
    if dx < 0:
        mask[:, :, dx:] = 0
    return mask


@pytest.mark.parametrize("skip_rows", [0, 1])
def test_distillation_targets_the_largest_configuration(tiny_config, skip_rows):
    torch.manual_seed(0)
    y, weights = torch.arange(8) % 10, grid_loss_weights(tiny_config, TrainConfig())
    k_max, l_max = weights.shape[0] - 1, weights.shape[1] - 1
    grid = torch.randn(8, *weights.shape, 10, requires_grad=True)  # stands in for the grid logits (B, K, L, C)
    recipe = TrainConfig(distill_weight=0.3, distill_skip_rows=skip_rows, label_smoothing=0.0)
    loss = training_loss(lambda x, widths: grid, torch.zeros(8, 1), y, torch.ones(8), weights, recipe)
    (grad,) = torch.autograd.grad(loss, grid)

    # by hand: the label for the largest configuration and the first skip_rows token rows, label and its
    # detached prediction for the rest
    labels, teacher = torch.nn.functional.one_hot(y, 10).float(), grid[:, k_max, l_max].detach().softmax(-1)
    expected = 0.0
    for k in range(weights.shape[0]):
        for l in range(weights.shape[1]):
            on_label = k < skip_rows or (k, l) == (k_max, l_max)
            target = labels if on_label else 0.7 * labels + 0.3 * teacher
            expected = expected + weights[k, l] * -(target * grid[:, k, l].log_softmax(-1)).sum(-1).mean()
    (expected_grad,) = torch.autograd.grad(expected, grid)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-6), "no gradient flows through the teacher"
    plain = training_loss(lambda x, widths: grid, torch.zeros(8, 1), y, torch.ones(8), weights, TrainConfig(label_smoothing=0.0))
    assert not torch.allclose(plain, loss)
    if skip_rows:  # the skipped rows really change the loss
        every_row = training_loss(lambda x, widths: grid, torch.zeros(8, 1), y, torch.ones(8), weights,
                                  dataclasses.replace(recipe, distill_skip_rows=0))
        assert not torch.allclose(every_row, loss)
    with pytest.raises(ValueError, match="distill_weight"):
        TrainConfig(distill_weight=1.5)
    with pytest.raises(ValueError, match="distill_skip_rows"):
        TrainConfig(distill_skip_rows=-1)
