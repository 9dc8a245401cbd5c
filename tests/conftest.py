import dataclasses

import pytest
import torch

from backbone import AdaPerceiver, AdaPerceiverConfig

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A short end-to-end run of experiments/train_policy.py on digits with a tiny backbone."""
    from backbone.checkpoint import save_checkpoint
    from experiments import train_policy

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    config = AdaPerceiverConfig(img_size=8, patch_size=2, embed_dim=16, num_heads=2, depth=3, token_grans=(2, 4, 8))
    save_checkpoint(AdaPerceiver(config), root / "backbone", {"dataset": "digits", "split_seed": 0})
    argv = [
        "--backbone", str(root / "backbone"), "--out", str(root / "policy"), "--json", str(root / "summary.json"),
        "--timesteps", "2048", "--lambdas", "0.05,0.5", "--cache-dir", str(root / "cache"), "--log-dir", str(root / "tb"),
    ]
    summary = train_policy.main(argv)
    return root, summary
