import dataclasses

import numpy as np
import pytest
import torch

from backbone import AdaPerceiver, AdaPerceiverConfig
from envs import OutcomeTable

torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> AdaPerceiverConfig:
    return AdaPerceiverConfig(
        img_size=8, in_chans=1, patch_size=2, embed_dim=16, num_heads=2, depth=3,
        token_grans=(2, 4, 8), ffn_widths=(0.25, 0.5, 1.0), num_classes=10,
    )


def perturbed_model(config: AdaPerceiverConfig) -> AdaPerceiver:
    """A seeded model in eval mode whose every path matters."""
    torch.manual_seed(0)
    model = AdaPerceiver(config).eval()
    # random init has LayerScale 0.1 and near-uniform attention; perturb so every path matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def tiny_model(tiny_config) -> AdaPerceiver:
    return perturbed_model(tiny_config)


@pytest.fixture
def tiny_stem_model(tiny_config) -> AdaPerceiver:
    """The tiny model with a convolutional patch embedding (one 3x3 stride-2 conv of 4 channels)."""
    return perturbed_model(dataclasses.replace(tiny_config, stem_channels=(4,)))


def save_tiny_backbone(directory) -> None:
    """A seeded, untrained tiny digits backbone saved as a checkpoint (for end-to-end runs of the scripts)."""
    from backbone.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = AdaPerceiverConfig(img_size=8, patch_size=2, embed_dim=16, num_heads=2, depth=3, token_grans=(2, 4, 8))
    save_checkpoint(AdaPerceiver(config), directory, {"dataset": "digits", "split_seed": 0})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A short end-to-end run of experiments/train_policy.py on digits with a tiny backbone."""
    from experiments import train_policy

    root = tmp_path_factory.mktemp("run")
    save_tiny_backbone(root / "backbone")
    argv = [
        "--backbone", str(root / "backbone"), "--out", str(root / "policy"), "--json", str(root / "summary.json"),
        "--timesteps", "4096", "--lam-range", "0.01,1", "--quiet", "--cache-dir", str(root / "cache"), "--log-dir", str(root / "tb"),
    ]
    summary = train_policy.main(argv)
    return root, summary


def synthetic_table(correct: np.ndarray, confidence: np.ndarray | None = None, agree: np.ndarray | None = None,
                    staged: np.ndarray | None = None) -> OutcomeTable:
    """A table with a known answer: ``correct`` ``(n, K, L, M)`` (true class 0; a wrong prediction is class 1, or
    class 2 where ``agree`` says it agrees with a wrong full configuration), FLOPs ``100 * (k+1)(l+1)(m+1)``."""
    n, k, l, m = correct.shape
    flops = (np.arange(1, k + 1)[:, None, None] * np.arange(1, l + 1)[None, :, None] * np.arange(1, m + 1)[None, None, :]) * 100
    predicted = np.where(correct, 0, 1).astype(np.int16)
    if agree is not None:  # make predictions agree (or not) with the full configuration's
        full = predicted[:, -1:, -1:, -1:]
        predicted = np.where(agree, full, np.where(full == 0, 1, 0)).astype(np.int16)
    return OutcomeTable(
        features=np.zeros((n, 2), np.float32), predicted=predicted, true_logprob=np.zeros(correct.shape, np.float32),
        confidence=np.ones(correct.shape, np.float32) if confidence is None else confidence,
        labels=np.zeros(n, np.int64), flops=flops.astype(np.int64),
        staged_flops=(flops if staged is None else staged).astype(np.int64),
        token_grans=tuple(range(1, k + 1)), ffn_widths=tuple(np.linspace(1 / m, 1, m)), meta={},
    )
