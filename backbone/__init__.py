"""AdaPerceiver backbone: model, FLOP model, data, joint training and checkpoints."""

from backbone.config import AdaPerceiverConfig
from backbone.flops import embed_flops, flops, flops_grid, input_adapter_flops, measure_flops, readout_flops
from backbone.model import AdaPerceiver

__all__ = [
    "AdaPerceiver",
    "AdaPerceiverConfig",
    "embed_flops",
    "flops",
    "flops_grid",
    "input_adapter_flops",
    "measure_flops",
    "readout_flops",
]
