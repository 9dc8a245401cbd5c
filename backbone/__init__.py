"""AdaPerceiver backbone: model, FLOP model, data, joint training and checkpoints."""

from backbone.config import AdaPerceiverConfig
from backbone.flops import (
    cascade_flops,
    embed_flops,
    extension_flops,
    flops,
    flops_grid,
    input_adapter_flops,
    measure_flops,
    readout_flops,
)
from backbone.model import AdaPerceiver, GlanceState

__all__ = [
    "AdaPerceiver",
    "AdaPerceiverConfig",
    "GlanceState",
    "cascade_flops",
    "embed_flops",
    "extension_flops",
    "flops",
    "flops_grid",
    "input_adapter_flops",
    "measure_flops",
    "readout_flops",
]
