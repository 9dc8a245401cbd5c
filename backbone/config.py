"""Architecture configuration of the AdaPerceiver backbone."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from backbone.errors import ProjectError


class ConfigError(ProjectError):
    """An architecture that cannot be built, or a configuration that is not on its grid."""


@dataclass(frozen=True)
class AdaPerceiverConfig:
    """Everything that fixes the backbone's architecture and its configuration grid."""

    img_size: int = 8
    """Height and width of the (square) input image, in pixels."""
    in_chans: int = 1
    """Number of input channels."""
    patch_size: int = 2
    """Side of one square patch, in pixels; ``img_size`` must be a multiple."""
    embed_dim: int = 64
    """Width ``D`` of every token."""
    num_heads: int = 4
    """Attention heads; ``embed_dim / num_heads`` must be even (RoPE rotates pairs)."""
    depth: int = 4
    """Number of latent blocks ``L``; every depth ``1..L`` is an exit."""
    ffn_ratio: float = 4.0
    """FFN hidden size ``H`` as a multiple of ``embed_dim``."""
    token_grans: tuple[int, ...] = (2, 4, 8, 16)
    """Token granularities ``g1 < ... < gK``; ``gK`` is the number of latents ``N_max``."""
    ffn_widths: tuple[float, ...] = (0.25, 0.5, 1.0)
    """Matryoshka FFN widths as fractions of ``H``, ascending, the last 1.0."""
    num_classes: int = 10
    """Number of output classes."""
    rope_theta: float = 100.0
    """RoPE base; latent positions only go up to ``N_max``, so a small base suffices."""
    layerscale_init: float = 1e-1
    """Initial LayerScale value on both branches of every block."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block (linearly increasing over depth)."""
    stem_channels: tuple[int, ...] = ()
    """Empty: linear patch embedding. Else a convolutional patch embedding: one 3x3 stride-2
    conv (BatchNorm, ReLU) per entry with that many channels, then a 1x1 conv to ``embed_dim``;
    ``patch_size`` must then be ``2 ** len(stem_channels)``."""

    def __post_init__(self) -> None:
        errors = []
        if self.img_size <= 0 or self.patch_size <= 0 or self.img_size % self.patch_size:
            errors.append(
                f"img_size ({self.img_size}) must be a positive multiple of patch_size ({self.patch_size})"
            )
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
            errors.append(
                f"embed_dim ({self.embed_dim}) / num_heads ({self.num_heads}) must be an even integer"
            )
        stem = tuple(self.stem_channels)
        if stem and (any(ch < 1 for ch in stem) or self.patch_size != 2 ** len(stem)):
            errors.append(
                f"stem_channels {stem} needs positive channel counts and patch_size == 2 ** {len(stem)}"
                f" (got patch_size {self.patch_size}); use () for a linear patch embedding"
            )
        if self.depth < 1:
            errors.append(f"depth must be >= 1, got {self.depth}")
        grans = tuple(self.token_grans)
        if not grans or any(g < 1 for g in grans) or list(grans) != sorted(set(grans)):
            errors.append(f"token_grans must be strictly increasing positive ints, got {grans}")
        widths = tuple(self.ffn_widths)
        if (
            not widths
            or list(widths) != sorted(set(widths))
            or not math.isclose(widths[-1], 1.0)
            or widths[0] <= 0
        ):
            errors.append(f"ffn_widths must be strictly increasing fractions ending in 1.0, got {widths}")
        if self.num_classes < 2:
            errors.append(f"num_classes must be >= 2, got {self.num_classes}")
        if errors:
            raise ConfigError("invalid AdaPerceiverConfig: " + "; ".join(errors))
        object.__setattr__(self, "token_grans", tuple(int(g) for g in grans))
        object.__setattr__(self, "ffn_widths", tuple(float(w) for w in widths))
        object.__setattr__(self, "stem_channels", tuple(int(ch) for ch in stem))

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def max_tokens(self) -> int:
        return self.token_grans[-1]

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """``(K, L, M)``: token granularities x exit depths x FFN widths."""
        return len(self.token_grans), self.depth, len(self.ffn_widths)

    def grid_axes(self) -> dict[str, list]:
        """The grid's axes as JSON lists: ``token_grans``, ``depths`` (1-based exit depths) and ``ffn_widths``."""
        return {"token_grans": [int(g) for g in self.token_grans], "depths": list(range(1, self.depth + 1)),
                "ffn_widths": [float(w) for w in self.ffn_widths]}

    @property
    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.ffn_ratio)

    def ffn_hidden_units(self, width: float) -> int:
        """Hidden units used by the FFN at ``width`` (a fraction listed in ``ffn_widths``)."""
        return max(1, round(self.ffn_hidden * self.ffn_widths[self.width_index(width)]))

    def token_index(self, tokens: int) -> int:
        if tokens not in self.token_grans:
            raise ConfigError(f"tokens={tokens} is not a token granularity; allowed: {list(self.token_grans)}")
        return self.token_grans.index(tokens)

    def width_index(self, width: float) -> int:
        for i, w in enumerate(self.ffn_widths):
            if math.isclose(float(width), w, rel_tol=1e-6):
                return i
        raise ConfigError(f"width={width} is not an FFN width; allowed: {list(self.ffn_widths)}")

    def check_depth(self, depth: int) -> int:
        if not isinstance(depth, int) or not 1 <= depth <= self.depth:
            raise ConfigError(f"depth={depth} is outside 1..{self.depth}")
        return depth

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdaPerceiverConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown AdaPerceiverConfig fields {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        for key in ("token_grans", "ffn_widths", "stem_channels"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def paper_config(num_classes: int = 1000) -> AdaPerceiverConfig:
    """The paper's ImageNet-1K model at its own sizes, for measuring where compute, not per-call overhead, sets the time.

    AdaPerceiver (Jajal et al., 2025, arXiv 2511.18105) publishes one ImageNet-1K classifier; these sizes are those
    of its public training config (``config/supervised/soadaperciever_1k.yaml`` in github.com/pjjajal/adaperceiver-public):
    224 px RGB in 16 px patches (196 input tokens), embedding 832, 13 heads (head dim 64), 21 blocks, FFN ratio
    2.57, up to 256 latent tokens in the granularities 32/64/96/128/192/256, RoPE base 10,000; 75 GFLOPs per image
    at the full configuration (``backbone.flops``). Its Matryoshka widths are embedding dimensions 416/624/832;
    here a width slices the FFN hidden layer (DESIGN.md), so they become FFN widths 0.5/0.75/1.0. Grid: 6 x 21 x 3
    = 378 configurations.
    """
    return AdaPerceiverConfig(img_size=224, in_chans=3, patch_size=16, embed_dim=832, num_heads=13, depth=21,
                              ffn_ratio=2.57, token_grans=(32, 64, 96, 128, 192, 256), ffn_widths=(0.5, 0.75, 1.0),
                              num_classes=num_classes, rope_theta=10000.0)


PRESETS = {"paper-in1k": paper_config}
"""Named architectures (``--preset``), each a function of the number of classes; ``"auto"`` picks by dataset."""


def preset(dataset: str, image_shape: tuple[int, int, int], num_classes: int, name: str = "auto") -> AdaPerceiverConfig:
    """The architecture for a dataset: ``name`` from ``PRESETS``, or ``"auto"``: the digits and Fashion-MNIST
    models, else one by image size. A named preset refuses images of another shape than its own."""
    chans, size, _ = image_shape
    if name != "auto":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose auto or one of {', '.join(PRESETS)}")
        config = PRESETS[name](num_classes)
        if tuple(image_shape) != (config.in_chans, config.img_size, config.img_size):
            raise ConfigError(f"the {name} preset takes {config.in_chans}x{config.img_size}x{config.img_size} images, "
                              f"the dataset has {'x'.join(map(str, image_shape))}; resize them or use --preset auto")
        return config
    if dataset == "digits":
        # a one-conv stem: the linear-patch model fell 0.87 pp short of its full-only reference (README)
        return AdaPerceiverConfig(img_size=8, in_chans=1, patch_size=2, embed_dim=64, num_heads=8, depth=4,
                                  token_grans=(2, 4, 8, 16), num_classes=num_classes, stem_channels=(32,))
    patch = 4 if size % 4 == 0 else (2 if size % 2 == 0 else 1)
    # a conv stem and 16 heads: on Fashion-MNIST the linear-patch, 8-head model underfits (README)
    stem = (32, 64)[: patch.bit_length() - 1]
    return AdaPerceiverConfig(img_size=size, in_chans=chans, patch_size=patch, embed_dim=128, num_heads=16, depth=8,
                              token_grans=(4, 8, 16, 32), num_classes=num_classes, drop_path=0.05, stem_channels=stem)
