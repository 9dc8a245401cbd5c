"""The ``compiled`` path: each program through ``torch.compile`` (inductor), and what both compiling paths share.

At batch 1 on a CPU the small configurations, the ones a policy serves, spend more time launching operators than
multiplying. Inductor fuses each configuration's elementwise work (norms, RoPE, GELU, residuals) into a few
generated kernels around the matrix products, so the same numbers come out (within float noise) in fewer, larger
steps. Each call still passes dynamo's guards, about a thousand checks on the weights and arguments (~0.1 ms per
call on a CPU); the ``aot`` path has none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
import torch._dynamo
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from inference.runner import InferencePathError, Program, ProgramKey, ProgramRunner

AOT_INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "freezing": True, "cpp.weight_prepack": False}
"""Inductor options of both compiling paths. 1x1 convolutions (the conv stem's projection) as matrix products:
15% faster for the whole stem at batch 256 on a CPU. Freezing: the weights are constants of the program, so
inductor may fold work on the weights alone (slices, layouts) at compile time; 4-12% faster glance programs on
a CPU. Without weight prepacking, which made the stem 3x slower at batch 1."""
INDUCTOR_OPTIONS = {"cpp_wrapper": True, **AOT_INDUCTOR_OPTIONS}
"""Inductor options of the ``compiled`` path: a C++ wrapper calls the kernels, not Python."""

# inductor's C++ builder looks for a CUDA toolkit even for CPU kernels and warns when it finds one without a GPU;
# the CPU paths never use it, so the warning would only mislead
logging.getLogger("torch.utils.cpp_extension").addFilter(lambda record: "No CUDA runtime" not in record.getMessage())


def check_compiler(name: str, device: torch.device) -> None:
    """Inductor's CPU kernels are C++: refuse a CPU path without a C++ compiler, naming the fix."""
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise InferencePathError(f"the {name} path needs a C++ compiler for inductor's CPU kernels "
                                 "(apt-get install g++); or use the eager path")


@contextlib.contextmanager
def compiling(name: str) -> Iterator[None]:
    """Turn a compiler that fails, or an inductor cache that cannot be read or written, into one
    ``InferencePathError`` that names the fix (a failing build raises deep inside inductor otherwise)."""
    try:
        yield
    except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.CppCompileError,
            torch._inductor.exc.InvalidCxxCompiler, OSError) as err:
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise InferencePathError(
            f"the {name} path could not build a program ({type(err).__name__}: {reason[:200]}); check that the C++ "
            f"compiler works (g++ --version; apt-get install g++), remove inductor's cache (rm -rf {cache}) and "
            "run again, or use the eager path") from err


def torch_compiled(fn: Callable, name: str = "compiled") -> Callable:
    """``torch.compile(fn)`` with the project's inductor options; its integers and widths stay constants."""
    compiled = torch.compile(fn, options=INDUCTOR_OPTIONS)

    def call(*args):
        # a configuration's integers and widths are constants of its graph: left to dynamo's default, a second
        # configuration would make them symbolic, and the grid checks on them break the graph
        with compiling(name), torch._dynamo.config.patch(specialize_int=True, specialize_float=True):
            return compiled(*args)

    return call


class CompiledRunner(ProgramRunner):
    """Each program through ``torch.compile``: compiled on its first call, and again for a new batch-size class
    (one image, or any other), as dynamo does."""

    name = "compiled"

    def __init__(self, backbone, artifact) -> None:
        super().__init__(backbone, artifact)
        # one graph per configuration and batch-size class of the same code; by default dynamo falls back to
        # eager after 8, silently slow
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)

    @classmethod
    def check(cls, device: torch.device) -> None:
        check_compiler(cls.name, device)

    def key_of(self, program: Program) -> ProgramKey:
        # dynamo specializes a batch of one; its own program here, so that its compile time is counted too
        return replace(program.key, shapes=("one image",)) if program.batch_size == 1 else program.key

    def build(self, program: Program) -> Callable:
        return torch_compiled(program.fn, self.name)
