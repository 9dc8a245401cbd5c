"""The ``onnx`` path: each program exported with ``torch.onnx`` and run by ONNX Runtime, the deployment format
servers load. One session per program, with its own thread settings; ONNX Runtime's CPU kernels (MLAS) cost less
per small operator than eager torch, which is what the small configurations pay for at batch 1.

The exported files are cached (``cache_dir``) under a key of the weights, the program and the library versions,
each written atomically, so a second process loads instead of exporting. Optional: ``pip install -e ".[onnx]"``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from backbone.io import atomic_write
from inference.aot import export_program
from inference.runner import InferencePathError, Program, ProgramRunner, modules_of

CACHE_ENV = "ADAPERCEIVER_ONNX_CACHE"
"""Where exported programs are kept (default ``~/.cache/adaperceiver/onnx``)."""


class OnnxRunner(ProgramRunner):
    """Each program as an ONNX Runtime session (CPU execution provider; the CUDA one on a GPU, through host
    copies), exported on its first use (seconds each) or loaded from the cache."""

    name = "onnx"

    def __init__(self, backbone, artifact) -> None:
        super().__init__(backbone, artifact)
        self.cache_dir = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "adaperceiver" / "onnx")
        digest = hashlib.sha256()
        for module in modules_of(self):
            for name, tensor in module.state_dict().items():
                digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        import onnxruntime

        digest.update(f"{torch.__version__} {onnxruntime.__version__}".encode())
        self.weights_digest = digest.hexdigest()[:16]
        self.profiling: str | None = None
        """A file prefix, set before a program's first use: its session records ONNX Runtime's per-node profile
        there (``session.end_profiling()`` names the file)."""

    @classmethod
    def check(cls, device: torch.device) -> None:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise InferencePathError(f"the onnx path needs ONNX Runtime ({err.name} is missing): "
                                     "pip install -e \".[onnx]\"; or use the eager path") from err

    def build(self, program: Program) -> Callable:
        import onnxruntime

        path = self.cache_dir / self.weights_digest / f"{hashlib.sha256(repr(program.key).encode()).hexdigest()[:16]}.onnx"
        exported = export_program(program.fn, modules_of(self), program.args, program.batch_dims)
        if not path.is_file():
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the exporter's notes on its own internals
                onnx_program = torch.onnx.export(exported, dynamo=True, verbose=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, onnx_program.save)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        if self.profiling:
            options.enable_profiling, options.profile_file_prefix = True, self.profiling
        providers = ["CUDAExecutionProvider"] if self.device.type == "cuda" else []
        session = onnxruntime.InferenceSession(str(path), options, providers=[*providers, "CPUExecutionProvider"])
        return _Session(session, exported.call_spec.out_spec, self.device)


class _Session:
    """An ONNX Runtime session called with the program's arguments; its outputs as torch tensors."""

    def __init__(self, session, out_spec, device: torch.device) -> None:
        self.session, self.out_spec, self.device = session, out_spec, device
        self.names = [i.name for i in session.get_inputs()]

    def __call__(self, *args):
        flat = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
        if len(flat) != len(self.names):
            raise InferencePathError(f"an exported program takes {len(self.names)} inputs, got {len(flat)}; remove "
                                     f"the cache ({CACHE_ENV}) and run again")
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.names, flat, strict=True)}
        out = [torch.from_numpy(np.asarray(o)).to(self.device) for o in self.session.run(None, feeds)]
        return pytree.tree_unflatten(out, self.out_spec)
