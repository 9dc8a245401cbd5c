"""The ``graphs`` path (CUDA only): the eager kernels of each program recorded once per input shapes into a CUDA
graph and replayed with one launch. Nothing is compiled (a capture takes milliseconds); on a GPU the small
configurations are bound by kernel launches, which is what a replay removes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils._pytree as pytree

from backbone.model import GlanceState
from inference.plan import ExtensionPass, padded
from inference.runner import InferencePathError, Program, ProgramRunner


class GraphsRunner(ProgramRunner):
    """Each program as CUDA graphs, one per distinct input shapes; an extension's rows padded to powers of two,
    so that a handful of graphs serve every row count. Outputs are copies: a replay overwrites its buffers."""

    name = "graphs"

    @classmethod
    def check(cls, device: torch.device) -> None:
        if device.type != "cuda":
            raise InferencePathError(f"the graphs path replays CUDA graphs and needs a CUDA device, not {device}; "
                                     "on a CPU use the aot or compiled path")

    def build(self, program: Program) -> Callable:
        return GraphReplay(program.fn)

    def run(self, program: Program):
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, super().run(program))

    def extend(self, state: GlanceState, extension: ExtensionPass) -> torch.Tensor:
        # a graph replays fixed shapes: each depth's rows padded to a power of two, the padding's logits dropped
        logits = super().extend(state, padded(extension))
        sizes = [len(rows) for rows in padded(extension).rows_at_depth]
        parts = logits.split(sizes)
        return torch.cat([part[: len(rows)] for part, rows in zip(parts, extension.rows_at_depth, strict=True)])


class GraphReplay:
    """``fn`` replayed from CUDA graphs: one per distinct input shapes, recorded on the first call with them.

    The inputs are copied into the graph's own input buffers before each replay; the outputs are its output
    buffers, which the next replay overwrites. Each graph keeps a private memory pool, so replaying one never
    overwrites another's outputs. Graphs are kept for the life of the program.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.cuda.CUDAGraph, object]] = {}

    def __call__(self, *args):
        flat, spec = pytree.tree_flatten(args)
        key = tuple((t.shape, t.dtype, t.device) for t in flat)
        found = self.graphs.get(key)
        if found is None:
            found = self.graphs[key] = self._record(flat, spec)
        inputs, graph, outputs = found
        for buffer, arg in zip(inputs, flat, strict=True):
            buffer.copy_(arg)
        graph.replay()
        return outputs

    def _record(self, flat: list[torch.Tensor], spec) -> tuple[list[torch.Tensor], torch.cuda.CUDAGraph, object]:
        inputs = [t.clone() for t in flat]

        def run():
            return self.fn(*pytree.tree_unflatten(inputs, spec))

        # one untimed call on a side stream first: lazy set-up (cuBLAS handles, kernel choices) cannot be recorded
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        return inputs, graph, outputs
