"""The interface every inference path implements: the glance with its policy, an extension pass, a fresh pass.

A ``Runner`` owns how a path runs the backbone's programs (compiling, exporting, recording, padding, copying
outputs); the classifier above it only says what to run. Each of the three calls is a function of tensors with
its configuration as constants (``Program``), identified by a ``ProgramKey``; a runner decides what to build for
each key and caches it. ``EagerRunner`` runs the functions as they are: the reference every path must equal.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch

from backbone import AdaPerceiver
from backbone.errors import ProjectError
from backbone.grid import GridPoint
from backbone.model import GlanceState
from envs import features_from
from inference.plan import ExtensionPass
from policy.artifact import PolicyArtifact


class InferencePathError(ProjectError):
    """An inference path that is unknown, or unavailable on this machine."""


@dataclass
class Glance:
    """What the glance program returns for a batch of ``B`` images."""

    finite: torch.Tensor
    """0-d bool: every pixel was finite (checked inside the program, one launch fewer)."""
    input_tokens: torch.Tensor
    """``(B, P, D)`` the embedded images."""
    actions: torch.Tensor
    """``(B, 3)`` int64 the policy's actions ``(token index, depth - 1, width index)``."""
    logits: torch.Tensor | None = None
    """``(B, C)`` the glance's logits; None for a policy without a glance."""
    confidence: torch.Tensor | None = None
    """``(B,)`` the glance's max softmax probability."""
    classes: torch.Tensor | None = None
    """``(B,)`` int64 the glance's classes."""
    state: GlanceState | None = None
    """What an extension continues from."""


@dataclass(frozen=True)
class ProgramKey:
    """Which program: the glance (at a price column), an extension pass, or a fresh pass at a configuration."""

    kind: Literal["glance", "extend", "forward"]
    config: GridPoint | None = None
    """The fresh pass's configuration, or the glance's (for an extension, the one it continues from)."""
    price_column: float | None = None
    """The glance's price input of a price-conditioned policy."""
    tokens: int = 0
    """An extension's tokens, width and deepest exit, and whether it has per-row token counts and widths."""
    width: float = 0.0
    depth: int = 0
    per_row_tokens: bool = False
    per_row_widths: bool = False
    shapes: tuple = ()
    """Set by runners that build a program per input shapes (empty: one program serves every batch size)."""


@dataclass(frozen=True)
class Program:
    """A function of tensors (and lists of them) to run, with example arguments of a first call.

    ``batch_dims`` mirrors ``args``: for each tensor, the name of its dynamic first dimension (tensors with the
    same name have the same size) or None for a static one. An integer tensor with a batch dimension holds row
    indices into the others and may be empty.
    """

    key: ProgramKey
    fn: Callable
    args: tuple
    batch_dims: tuple

    @property
    def batch_size(self) -> int:
        """The size of the first ``"batch"`` dimension: how many images the call serves."""
        return _first_batch(self.args, self.batch_dims)


class Runner(ABC):
    """Runs the backbone's and the policy's programs on one inference path."""

    name: ClassVar[str]
    """The path's name, as ``path=`` and ``--path`` take it."""

    def __init__(self, backbone: AdaPerceiver, artifact: PolicyArtifact) -> None:
        self.backbone, self.artifact = backbone, artifact
        self.device = next(backbone.parameters()).device
        self.compile_seconds = 0.0
        """Seconds spent building programs before their first calls returned (compiling, exporting): what a
        throughput figure leaves out."""
        self.programs_built = 0
        """Programs built so far (the eager runner builds none)."""

    @classmethod
    def check(cls, device: torch.device) -> None:
        """Raise an ``InferencePathError`` naming the fix if this path cannot run on ``device``."""

    @abstractmethod
    def run(self, program: Program):
        """``program.fn(*program.args)`` as this path runs it; outputs the caller may keep."""

    # ---- the three calls --------------------------------------------------------------------------------
    def glance(self, images: torch.Tensor, price_column: float | None) -> Glance:
        """Embed, the glance, its features and the policy's actions for images ``(B, C, H, W)``, as one program."""
        model, artifact, spec = self.backbone, self.artifact, self.artifact.feature_spec
        glance_config = spec.glance_config(model.config) if spec.glance else None

        def glance_and_act(images: torch.Tensor):
            finite = torch.isfinite(images).all()
            input_tokens = model.embed(images)
            if glance_config is None:
                return finite, input_tokens, artifact.act_tensor(features_from(input_tokens, None, spec), price_column)
            k, v = model.read_kv(input_tokens)  # shared by the glance and every configuration
            logits, state = model.glance(input_tokens, *glance_config, read_kv=(k, v))
            actions = artifact.act_tensor(features_from(input_tokens, logits, spec), price_column)
            confidence, classes = logits.float().softmax(-1).max(-1)  # the answer when the glance answers all
            return finite, input_tokens, actions, logits, confidence, classes, k, v, *state.latents  # flat: fast (aot)

        key = ProgramKey("glance", price_column=price_column)
        finite, input_tokens, actions, *rest = self.run(Program(key, glance_and_act, (images,), ("batch",)))
        if not rest:
            return Glance(finite, input_tokens, actions)
        logits, confidence, classes, k, v, *latents = rest
        config = GridPoint(*model.resolve(*glance_config))
        return Glance(finite, input_tokens, actions, logits, confidence, classes, GlanceState(config, latents, (k, v)))

    def extend(self, state: GlanceState, extension: ExtensionPass) -> torch.Tensor:
        """Logits ``(n, C)`` of ``extension``'s rows (in ``extension.rows`` order), continued from the glance."""
        model, glance = self.backbone, state.config
        c, tokens, width = model.config, extension.tokens, extension.width

        def long(layout, value=lambda x: x) -> list[torch.Tensor]:
            if layout is None:
                return []  # absent per-row values travel as empty lists: one argument list for every program
            return [torch.tensor([value(x) for x in at_depth], dtype=torch.long, device=self.device) for at_depth in layout]

        rows = long(extension.rows_at_depth)
        per_row = [long(extension.row_tokens), long(extension.row_widths, c.ffn_hidden_units)]

        def extend_exits(latents, k, v, rows, row_tokens, row_hidden):
            return model.extend_exits(GlanceState(glance, list(latents), (k, v)), tokens, width, rows,
                                      row_tokens or None, row_hidden or None)

        key = ProgramKey("extend", glance, tokens=tokens, width=width, depth=extension.depth,
                         per_row_tokens=bool(per_row[0]), per_row_widths=bool(per_row[1]))
        depths = [f"rows_{d}" for d in range(1, extension.depth + 1)]
        dims = (["batch"] * len(state.latents), "batch", "batch", depths, *[depths if p else [] for p in per_row])
        return self.run(Program(key, extend_exits, (state.latents, *state.read_kv, rows, *per_row), dims))

    def forward(self, images: torch.Tensor, config: GridPoint) -> torch.Tensor:
        """Logits ``(B, C)`` of images ``(B, C, H, W)`` at one configuration, a fresh pass."""
        model, config = self.backbone, GridPoint(*config)
        return self.run(Program(ProgramKey("forward", config), lambda x: model(x, *config), (images,), ("batch",)))


class ProgramRunner(Runner):
    """A runner that builds each program once (``build``) and keeps it for the life of the runner."""

    def __init__(self, backbone: AdaPerceiver, artifact: PolicyArtifact) -> None:
        super().__init__(backbone, artifact)
        self.programs: dict[ProgramKey, Callable] = {}

    @abstractmethod
    def build(self, program: Program) -> Callable:
        """A callable that does what ``program.fn`` does, called with arguments shaped as ``program.args``."""

    def key_of(self, program: Program) -> ProgramKey:
        """The cache key of ``program``: its own, unless this path builds per input shapes."""
        return program.key

    def run(self, program: Program):
        key = self.key_of(program)
        built = self.programs.get(key)
        if built is None:
            start = time.perf_counter()
            built = self.programs[key] = self.build(replace(program, key=key))
            built(*program.args)  # a compiled program compiles (or loads) on its first call: time it here
            self.compile_seconds += time.perf_counter() - start
            self.programs_built += 1
        return built(*program.args)


def modules_of(runner: Runner) -> list[torch.nn.Module]:
    """The modules whose weights the programs read: the backbone and the policy network."""
    return [runner.backbone, runner.artifact.policy]


def shapes_of(args) -> tuple:
    """The shapes of every tensor in ``args`` (tensors and lists of them), in order."""
    out = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            out.append(tuple(arg.shape))
        else:
            out.append(shapes_of(arg))
    return tuple(out)


def _first_batch(args, dims) -> int:
    for arg, dim in zip(args, dims, strict=True):
        if isinstance(dim, (list, tuple)):
            found = _first_batch(arg, dim)
            if found >= 0:
                return found
        elif dim == "batch":
            return len(arg)
    return -1
