"""Inference paths: the eager reference, ``torch.compile``, AOTInductor (ahead-of-time compiled kernels), or
CUDA graphs.

At batch 1 on a CPU the small configurations, the ones a policy serves, spend more time launching
operators than multiplying. Both compiled paths fuse each configuration's elementwise work (norms, RoPE,
GELU, residuals) into a few generated kernels around the matrix products, so the same numbers come out
(within float noise) in fewer, larger steps:

- ``compiled``: ``torch.compile`` (inductor). Each call still passes dynamo's guards, about a thousand
  checks on the weights and arguments (~0.1 ms per call on a CPU).
- ``aot``: ``torch.export`` then AOTInductor. One shared library per function, called without guards;
  the batch size is a dynamic dimension, so one library serves every batch size.

Both compile each function on first use (seconds to tens of seconds each, a configuration at a time).

- ``graphs`` (CUDA only): the eager kernels, recorded once per function and input shapes into a CUDA graph and
  replayed with one launch. Nothing is compiled (a capture takes milliseconds); on a GPU the small
  configurations are bound by kernel launches, which is what a replay removes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence

import torch
import torch._dynamo
import torch.utils._pytree as pytree
from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.export import Dim

from backbone.errors import ProjectError

INFERENCE_PATHS = ("eager", "compiled", "aot", "graphs")
COMPILING_PATHS = ("compiled", "aot")
"""The paths that compile each program before its first call returns (seconds each)."""
AOT_INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "freezing": True, "cpp.weight_prepack": False}
"""Inductor options of both compiled paths. 1x1 convolutions (the conv stem's projection) as matrix products:
15% faster for the whole stem at batch 256 on a CPU. Freezing: the weights are constants of the program, so
inductor may fold work on the weights alone (slices, layouts) at compile time; 4-12% faster glance programs on
a CPU (docs/experiments.md). Without weight prepacking, which made the stem 3x slower at batch 1."""
INDUCTOR_OPTIONS = {"cpp_wrapper": True, **AOT_INDUCTOR_OPTIONS}
"""Inductor options of the ``compiled`` path: a C++ wrapper calls the kernels, not Python."""


class InferencePathError(ProjectError):
    """An inference path that is unknown, or unavailable on this machine."""


# inductor's C++ builder looks for a CUDA toolkit even for CPU kernels and warns when it finds one without a GPU;
# the CPU paths never use it, so the warning would only mislead
logging.getLogger("torch.utils.cpp_extension").addFilter(lambda record: "No CUDA runtime" not in record.getMessage())


@contextlib.contextmanager
def compiling(path: str) -> Iterator[None]:
    """Turn a compiler that fails, or an inductor cache that cannot be read or written, into one
    ``InferencePathError`` that names the fix (a failing build raises deep inside inductor otherwise)."""
    try:
        yield
    except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.CppCompileError,
            torch._inductor.exc.InvalidCxxCompiler, OSError) as err:
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise InferencePathError(
            f"the {path} path could not build a program ({type(err).__name__}: {reason[:200]}); check that the C++ "
            f"compiler works (g++ --version; apt-get install g++), remove inductor's cache (rm -rf {cache}) and "
            "run again, or use the eager path") from err


def check_inference_path(path: str, device: torch.device | str = "cpu") -> str:
    """``path`` if it is known and can run on ``device``; else an error that names the fix."""
    if path not in INFERENCE_PATHS:
        raise InferencePathError(f"unknown inference path {path!r}; choose one of {', '.join(INFERENCE_PATHS)}")
    if path == "graphs" and torch.device(device).type != "cuda":
        raise InferencePathError(f"the graphs path replays CUDA graphs and needs a CUDA device, not {device}; "
                                 "on a CPU use the aot or compiled path")
    compiler = any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
    if path != "eager" and torch.device(device).type == "cpu" and not compiler:
        raise InferencePathError(f"the {path} path needs a C++ compiler for inductor's CPU kernels "
                                 "(apt-get install g++); or use the eager path")
    return path


def for_path(fn: Callable, path: str, modules: Sequence[nn.Module], args: tuple, batch_dims: tuple) -> Callable:
    """``fn`` as the inference ``path`` runs it: itself (eager), ``torch.compile(fn)``, or an AOTInductor library.

    ``fn`` takes tensors (or lists of them) and returns the same; any configuration is a constant of it.
    ``modules`` are those whose weights it reads; ``args`` are arguments of a first call. ``batch_dims`` mirrors
    ``args``: for each tensor, the name of its dynamic first dimension (tensors with the same name have the same
    size), or None for a static one. An integer tensor with a batch dimension holds row indices into the others,
    and may be empty.

    On the ``graphs`` path the returned tensors are the graph's output buffers, which its next replay (the next
    call with the same input shapes) overwrites: a caller that keeps them clones them.
    """
    if path == "eager":
        return fn
    if path == "graphs":
        return _GraphReplay(fn)
    if path == "compiled":
        compiled = torch.compile(fn, options=INDUCTOR_OPTIONS)

        def call(*args):
            # a configuration's integers and widths are constants of its graph: left to dynamo's default, a
            # second configuration would make them symbolic, and the grid checks on them break the graph
            with compiling(path), torch._dynamo.config.patch(specialize_int=True, specialize_float=True):
                return compiled(*args)

        # one graph per configuration and batch-size class (1, or any other) of the same code; by default
        # dynamo falls back to eager after 8, silently slow
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
        return call
    with compiling(path):
        return _aot_compile(fn, modules, args, batch_dims)


class _Traced(nn.Module):
    """``fn`` as a module that owns ``modules``, so that export lifts their weights as the program's weights."""

    def __init__(self, fn: Callable, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.owners = nn.ModuleList(modules)
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _aot_compile(fn: Callable, modules: Sequence[nn.Module], args: tuple, batch_dims: tuple) -> Callable:
    dims: dict[str, Dim] = {}

    def spec(arg, names):
        if isinstance(names, (list, tuple)):
            return type(names)(spec(a, n) for a, n in zip(arg, names, strict=True))
        if names is None:
            return None
        # a batch has an image at least; a selection of rows may be empty
        return {0: dims.setdefault(names, Dim(names, min=1 if arg.is_floating_point() else 0))}

    def batch_of_two(arg, name):
        # export specializes a dimension of size 1, so trace a batch of 2: the first row twice, indices 0 and 0
        if isinstance(arg, (list, tuple)):
            return type(arg)(batch_of_two(a, n) for a, n in zip(arg, name, strict=True))
        if name is None:
            return arg
        return arg.new_zeros(2) if not arg.is_floating_point() else torch.cat([arg[:1], arg[:1]])

    with torch.inference_mode():
        program = torch.export.export(_Traced(fn, modules).eval(), batch_of_two(tuple(args), tuple(batch_dims)),
                                      dynamic_shapes=(spec(tuple(args), tuple(batch_dims)),))  # one entry: forward(*args)
    package = io.BytesIO()
    torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs=AOT_INDUCTOR_OPTIONS)
    package.seek(0)
    return _AotProgram(torch._inductor.aoti_load_package(package))


class _AotProgram:
    """A loaded AOTInductor package, called as the package calls itself but with its call spec parsed once (the
    package's ``__call__`` parses it from JSON on every call: 40 us of a 0.4 ms batch-1 request here)."""

    def __init__(self, package) -> None:
        self.loader = package.loader
        self.out_spec = pytree.treespec_loads(self.loader.get_call_spec()[1])
        # one tensor, or a tuple of them, comes back without pytree: unflattening costs up to 20 us a call
        self.one_out = self.out_spec.is_leaf()
        self.flat_out = self.out_spec.type is tuple and all(child.is_leaf() for child in self.out_spec.children())

    def __call__(self, *args):
        flat = []
        for arg in args:  # tensors and lists of them: 1 us here, 7 through pytree
            if isinstance(arg, torch.Tensor):
                flat.append(arg)
            elif isinstance(arg, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in arg):
                flat.extend(arg)
            else:
                flat = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
                break
        out = self.loader.boxed_run(flat)
        if self.one_out:
            return out[0]
        return out if self.flat_out else pytree.tree_unflatten(out, self.out_spec)


class _GraphReplay:
    """``fn`` replayed from CUDA graphs: one per distinct input shapes, recorded on the first call with them.

    The inputs are copied into the graph's own input buffers before each replay; the outputs are its output
    buffers (see ``for_path``). Each graph keeps a private memory pool, so replaying one never overwrites another's
    outputs. Graphs are kept for the life of the program: a server that sends many batch sizes records (and
    holds memory for) each, so it pads its batches to a few sizes.
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
