"""The inference paths by name: ``path=`` and ``--path`` choose a runner here, and nothing else names one."""

from __future__ import annotations

import torch

from backbone import AdaPerceiver
from inference.aot import AotRunner, aot_compile
from inference.compiled import CompiledRunner, compiling, torch_compiled
from inference.eager import EagerRunner
from inference.graphs import GraphsRunner
from inference.onnx_runtime import OnnxRunner
from inference.runner import InferencePathError, Runner
from policy.artifact import PolicyArtifact

RUNNERS: dict[str, type[Runner]] = {runner.name: runner for runner in (EagerRunner, CompiledRunner, AotRunner,
                                                                        GraphsRunner, OnnxRunner)}
INFERENCE_PATHS = tuple(RUNNERS)
COMPILING_PATHS = ("compiled", "aot")
"""The paths that compile each program before its first call returns (seconds each)."""


def runner_class(path: str, device: torch.device | str = "cpu") -> type[Runner]:
    """The runner of ``path`` if it is known and can run on ``device``; else an error that names the fix."""
    if path not in RUNNERS:
        raise InferencePathError(f"unknown inference path {path!r}; choose one of {', '.join(INFERENCE_PATHS)}")
    RUNNERS[path].check(torch.device(device))
    return RUNNERS[path]


def make_runner(path: str, backbone: AdaPerceiver, artifact: PolicyArtifact) -> Runner:
    """A runner of ``path`` for ``backbone`` and ``artifact``, on the backbone's device."""
    return runner_class(path, next(backbone.parameters()).device)(backbone, artifact)


KERNEL_BUILDERS = {"eager": lambda fn, args, dims: fn, "compiled": lambda fn, args, dims: torch_compiled(fn),
                   "aot": lambda fn, args, dims: aot_compile(fn, [], args, dims)}


def compile_kernel(path: str, fn, args: tuple, batch_dims: tuple):
    """A weightless function of tensors (an attention kernel, say) as a compiling path builds it, for benchmarks."""
    if path not in KERNEL_BUILDERS:
        raise InferencePathError(f"kernels run on {', '.join(KERNEL_BUILDERS)}, not {path!r}")
    runner_class(path)
    with compiling(path):
        return KERNEL_BUILDERS[path](fn, args, batch_dims)
