"""The ``aot`` path: each program exported (``torch.export``) and compiled ahead of time by AOTInductor.

One shared library per program, called without dynamo's guards; the batch size is a dynamic dimension, so one
library serves every batch size, except one image, which gets a library compiled for its exact shapes (as
``torch.compile`` does by itself): the glance's is about 10% faster that way, and an extension's 18-30%, since
the program of every batch size pays calls on empty tensors at the depths where no input leaves.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

from inference.compiled import AOT_INDUCTOR_OPTIONS, check_compiler, compiling
from inference.runner import Program, ProgramKey, ProgramRunner, modules_of, shapes_of


class AotRunner(ProgramRunner):
    """Each program as an AOTInductor library, compiled on its first use (seconds to tens of seconds each)."""

    name = "aot"

    @classmethod
    def check(cls, device: torch.device) -> None:
        check_compiler(cls.name, device)

    def key_of(self, program: Program) -> ProgramKey:
        if program.batch_size == 1:
            return replace(program.key, shapes=shapes_of(program.args))
        return program.key

    def build(self, program: Program) -> Callable:
        dims = program.batch_dims if not program.key.shapes else static(program.batch_dims)
        with compiling(self.name):
            return aot_compile(program.fn, modules_of(self), program.args, dims)


def static(batch_dims):
    """``batch_dims`` with every dimension static (None), in the same layout."""
    if isinstance(batch_dims, (list, tuple)):
        return type(batch_dims)(static(d) for d in batch_dims)
    return None


class _Traced(nn.Module):
    """``fn`` as a module that owns ``modules``, so that export lifts their weights as the program's weights."""

    def __init__(self, fn: Callable, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.owners = nn.ModuleList(modules)
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def aot_compile(fn: Callable, modules: Sequence[nn.Module], args: tuple, batch_dims: tuple) -> Callable:
    """``fn`` exported with ``batch_dims`` (see ``Program``) and compiled by AOTInductor into a loaded library."""
    program = export_program(fn, modules, args, batch_dims)
    package = io.BytesIO()
    torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs=AOT_INDUCTOR_OPTIONS)
    package.seek(0)
    return _AotProgram(torch._inductor.aoti_load_package(package))


def export_program(fn: Callable, modules: Sequence[nn.Module], args: tuple,
                   batch_dims: tuple) -> torch.export.ExportedProgram:
    """``fn`` as ``torch.export`` traces it, with the weights of ``modules`` as its weights and a dynamic first
    dimension for each name in ``batch_dims`` (None: static)."""
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
        return torch.export.export(_Traced(fn, modules).eval(), batch_of_two(tuple(args), tuple(batch_dims)),
                                   dynamic_shapes=(spec(tuple(args), tuple(batch_dims)),))  # one entry: forward(*args)


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
