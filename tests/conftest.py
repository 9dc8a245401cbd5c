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


@pytest.fixture
def tiny_model(tiny_config) -> AdaPerceiver:
    torch.manual_seed(0)
    model = AdaPerceiver(tiny_config).eval()
    # random init has LayerScale 0.1 and near-uniform attention; perturb so every path matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model
