"""Joint ("once-for-all") training of the AdaPerceiver over its whole configuration grid."""

from __future__ import annotations

import json
import math
import pickle
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import convert_sync_batchnorm
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from backbone.checkpoint import CONFIG, save_checkpoint
from backbone.config import AdaPerceiverConfig
from backbone.data import Dataset
from backbone.distributed import init_distributed
from backbone.errors import ProjectError
from backbone.folders import head, image_batches
from backbone.grid import format_grid, grid_accuracy
from backbone.io import atomic_write, write_json
from backbone.model import AdaPerceiver

STATE = "train_state.pt"
STATE_KEYS = {"model": dict, "optimizer": dict, "generator": torch.Tensor, "epoch": int, "elapsed_s": float}


def load_train_state(path: Path, device: torch.device, with_ema: bool = False) -> dict:
    """The resume state a previous run wrote, loaded with ``weights_only=True`` (tensors and plain
    containers only: nothing in the file is ever executed); a corrupt, foreign or crafted file is a
    ``ProjectError`` that says to delete it."""
    fix = "delete it (or pass --fresh) to start over"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError,
            KeyError, IndexError) as err:
        # torch's own message would suggest weights_only=False, i.e. running the file's code: not repeated here
        raise ProjectError(f"{path} is corrupt or not a training state ({type(err).__name__}); {fix}") from err
    wanted = {**STATE_KEYS, **({"ema": dict} if with_ema else {})}
    if not isinstance(state, dict):
        raise ProjectError(f"{path} is not a training state (a {type(state).__name__}); {fix}")
    wrong = [key for key, kind in wanted.items()
             if not isinstance(state.get(key), kind if kind is not float else (int, float))]
    if wrong:
        raise ProjectError(f"{path} is not a training state (missing or malformed {wrong}); {fix}")
    return state


@dataclass
class TrainConfig:
    """Recipe of one backbone training run; defaults train the digits model in a few minutes."""

    epochs: int = 60
    """Passes over the backbone-train split."""
    batch_size: int = 128
    """Images per optimizer step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (after warm-up)."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.05
    """AdamW weight decay (timm leaves norms and biases undecayed)."""
    warmup_epochs: float = 3.0
    """Linear warm-up length, in epochs."""
    objective: str = "grid"
    """'grid': cross-entropy over every (tokens, depth) at a per-sample width; 'full': full configuration only."""
    depth_weight_power: float = 1.0
    """Grid loss weight of exit depth ``l`` is ``(l / L) ** power`` (favours deeper exits)."""
    token_weight_power: float = 0.5
    """Grid loss weight of granularity ``g`` is ``(g / N_max) ** power`` (favours more tokens)."""
    full_width_share: float = 0.5
    """Share of each batch trained at full width; the rest draws a width uniformly."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy."""
    augment_shift: int = 1
    """Random translation by up to this many whole pixels (0 turns it off)."""
    augment_flip: bool = False
    """Random horizontal flips (right for clothes, wrong for digits)."""
    mixup_alpha: float = 0.0
    """Mixup: blend pairs of inputs and their labels by ``lam ~ Beta(alpha, alpha)`` (0 turns it off)."""
    distill_weight: float = 0.0
    """In-place distillation (grid objective): every smaller (tokens, depth) learns from a target that mixes
    the label with this share of the row's own largest configuration's detached prediction (0 turns it off)."""
    distill_skip_rows: int = 0
    """In-place distillation leaves this many token rows (the fewest tokens first, where a glance sits) on the
    label alone, so their confidence is learned from labels only (0: every row but the largest configuration's
    learns from it)."""
    ema_decay: float = 0.0
    """Decay of an EMA of the weights, saved instead of the raw weights when > 0."""
    seed: int = 0
    """Seed of initialisation, batch order, widths and augmentation."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast)."""
    compile: bool = False
    """Wrap the training forward in ``torch.compile`` (worth it on GPUs; ~0-6% on this CPU)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""
    eval_batch_size: int = 512
    """Batch size of evaluation passes."""
    eval_limit: int = 2000
    """Calibration images scored after each epoch (the final grid uses all of them)."""

    def __post_init__(self) -> None:
        if self.objective not in ("grid", "full"):
            raise ValueError(f"objective must be 'grid' or 'full', got {self.objective!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "eval_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr {self.lr}, min_lr {self.min_lr}")
        for name in ("weight_decay", "warmup_epochs", "augment_shift", "distill_skip_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("label_smoothing", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.full_width_share <= 1:
            raise ValueError(f"full_width_share must be in [0, 1], got {self.full_width_share}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {self.mixup_alpha}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"distill_weight must be in [0, 1] (0 turns distillation off), got {self.distill_weight}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ProjectError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def grid_loss_weights(model_config: AdaPerceiverConfig, train: TrainConfig) -> torch.Tensor:
    """Weights ``(K, L)`` of the grid loss, summing to 1."""
    c = model_config
    tokens = (torch.tensor(c.token_grans, dtype=torch.float32) / c.max_tokens) ** train.token_weight_power
    depths = (torch.arange(1, c.depth + 1, dtype=torch.float32) / c.depth) ** train.depth_weight_power
    weights = tokens[:, None] * depths[None, :]
    return weights / weights.sum()


def augment(x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` whole pixels (zero fill) and optional horizontal flip."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if flip:
        theta[:, 0, 0] = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    if shift > 0:
        # whole-pixel offsets with nearest sampling: a clean shift, no blur of tiny images
        offsets = torch.randint(-shift, shift + 1, (b, 2), generator=generator).float()
        theta[:, 0, 2] = offsets[:, 0] * 2 / w
        theta[:, 1, 2] = offsets[:, 1] * 2 / h
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def mixup(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each input with a random partner: images ``(B, C, H, W)`` and soft targets ``(B, num_classes)``."""
    # lam drawn from the training generator, so that resuming and every rank draw the same value
    seed = int(torch.randint(2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    partner = torch.randperm(len(x), generator=generator)
    targets = F.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x[partner], lam * targets + (1 - lam) * targets[partner]


def sample_widths(model_config: AdaPerceiverConfig, batch: int, full_share: float, generator: torch.Generator) -> torch.Tensor:
    """One FFN width per sample ``(B,)``: full width with probability ``full_share``, else uniform."""
    widths = torch.tensor(model_config.ffn_widths)
    choice = torch.randint(len(widths), (batch,), generator=generator)
    full = torch.rand(batch, generator=generator) < full_share
    choice[full] = len(widths) - 1
    return widths[choice]


class TrainingForward(nn.Module):
    """What the objective runs (the module DDP wraps): the grid at per-sample widths, or the full configuration."""

    def __init__(self, model: AdaPerceiver, objective: str) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, L, C)`` for 'grid', ``(B, C)`` for 'full'."""
        if self.objective == "grid":
            return self.model.forward_grid(x, widths.to(x.device))
        return self.model(x)


def training_loss(
    forward: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    widths: torch.Tensor,
    weights: torch.Tensor,
    train: TrainConfig,
    normalizer: float | None = None,
) -> torch.Tensor:
    """The objective of ``train.objective`` on one batch, summed over inputs and divided by ``normalizer``.

    ``y`` is class indices ``(B,)`` or soft targets ``(B, C)`` (mixup).

    ``normalizer`` defaults to the batch size (a mean); a rank of a distributed job passes
    ``global batch / world`` so that averaged gradients equal those of the global batch.
    """
    normalizer = float(len(x)) if normalizer is None else normalizer
    if train.objective == "full":
        return F.cross_entropy(forward(x, widths).float(), y, label_smoothing=train.label_smoothing, reduction="sum") / normalizer
    logits = forward(x, widths).float()  # (B, K, L, C)
    b, k, l, c = logits.shape
    targets = y[:, None, None].expand(b, k, l) if y.dim() == 1 else y[:, None, None, :].expand(b, k, l, c)
    if train.distill_weight > 0:
        # the largest configuration keeps the label; the others also follow it, which pulls the grid
        # towards one consistent function instead of K * L competing ones
        labels = F.one_hot(y, c).float() if y.dim() == 1 else y
        teacher = logits[:, -1, -1].detach().softmax(-1)
        soft = (1 - train.distill_weight) * labels + train.distill_weight * teacher
        targets = soft[:, None, None, :].expand(b, k, l, c).clone()
        targets[:, : train.distill_skip_rows] = labels[:, None, None, :]  # rows kept on the label alone
        targets[:, -1, -1] = labels
    per_exit = F.cross_entropy(
        logits.reshape(b * k * l, c), targets.reshape(b * k * l, *targets.shape[3:]),
        label_smoothing=train.label_smoothing, reduction="none",
    ).view(b, k, l)
    return (per_exit.sum(0) * weights.to(per_exit.device)).sum() / normalizer


RUN_ONLY = ("device", "compile", "eval_batch_size", "eval_limit")
"""TrainConfig fields a resumed run may change: they do not change the steps it takes."""


def resume_settings(model_config: AdaPerceiverConfig, train: TrainConfig, data: Dataset | None = None) -> str:
    """The architecture, recipe and (for an image folder) file list a resumed run must share with the run that
    wrote the state (JSON text)."""
    recipe = {k: v for k, v in asdict(train).items() if k not in RUN_ONLY}
    files = {"files_digest": data.record["files_digest"]} if data is not None and data.record else {}
    return json.dumps({"architecture": model_config.to_dict(), "recipe": recipe, "data": files}, sort_keys=True)


def check_resumable(state: dict, model_config: AdaPerceiverConfig, train: TrainConfig, path: Path,
                    data: Dataset | None = None) -> None:
    """Refuse to resume a state written with another architecture, recipe or image folder file list."""
    found = json.loads(state.get("settings", "{}") or "{}")
    wanted = json.loads(resume_settings(model_config, train, data))
    if isinstance(found.get("recipe"), dict):
        # a recipe field added after the state was written is absent from it; each is added with a default
        # that trains as before, so the state's run used that default
        defaults = json.loads(resume_settings(model_config, TrainConfig(), data))["recipe"]
        found["recipe"] = {**defaults, **found["recipe"]}
    differ = sorted(f"{part}.{k}" for part in ("architecture", "recipe", "data")
                    for k in set(wanted[part]) | set(found.get(part, {}))
                    if wanted[part].get(k) != found.get(part, {}).get(k))
    if differ:
        raise ProjectError(f"{path} was written by a run with other settings ({', '.join(differ[:6])}); "
                           "pass --fresh to start over, or --out for another directory")


def check_out_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse to train over a finished checkpoint unless ``force`` (checked again by ``train_backbone``; a script
    calls it first, before reading any data)."""
    if (Path(out_dir) / CONFIG).is_file() and not force:
        raise ProjectError(f"{out_dir} already holds a finished checkpoint; pass --force to train over it, "
                           "or --out for a new directory")


def train_backbone(
    model_config: AdaPerceiverConfig,
    train: TrainConfig,
    data: Dataset,
    out_dir: str | Path,
    metadata: dict | None = None,
    resume: bool = True,
    force: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> dict:
    """Train, checkpoint every epoch (resumable), then save the model and its calibration grid.

    Writes ``model.safetensors``, ``config.json`` (and ``extra_files`` with them, e.g. an image folder's
    ``splits.json``), ``grid_accuracy.json`` and TensorBoard logs under ``out_dir/tb``. The images of ``data``
    are in-memory tensors or image files streamed batch by batch (``backbone.folders``). Returns the summary
    written to ``grid_accuracy.json``.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    resume = resume and not force
    ctx = init_distributed(resolve_device(train.device))
    device = ctx.device
    torch.manual_seed(train.seed)
    model = AdaPerceiver(model_config).to(device)
    ema = ModelEmaV3(model, decay=train.ema_decay) if train.ema_decay > 0 else None
    x_train, y_train = data.splits["backbone_train"].x, data.splits["backbone_train"].y
    x_val, y_val = data.splits["calibration"].x, data.splits["calibration"].y
    steps_per_epoch = math.ceil(len(y_train) / train.batch_size)
    total_steps = train.epochs * steps_per_epoch
    optimizer = create_optimizer_v2(model, "adamw", lr=train.lr, weight_decay=train.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=train.min_lr,
        warmup_t=int(train.warmup_epochs * steps_per_epoch),
        warmup_lr_init=train.lr * 0.01,
        t_in_epochs=False,
    )
    weights = grid_loss_weights(model_config, train)
    # every rank draws the same global batches, widths and augmentations from this generator
    generator = torch.Generator().manual_seed(train.seed)
    start_epoch, elapsed = 0, 0.0

    state_path = out_dir / STATE
    if resume and state_path.is_file():
        state = load_train_state(state_path, device, ema is not None)
        check_resumable(state, model_config, train, state_path, data)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
            generator.set_state(state["generator"])
            start_epoch, elapsed = int(state["epoch"]), float(state["elapsed_s"])
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as err:
            raise ProjectError(f"{state_path} does not fit this run ({type(err).__name__}); "
                               "delete it (or pass --fresh) to start over") from err
        if ctx.is_main:
            print(f"resuming from {state_path} at epoch {start_epoch}")

    forward: nn.Module = TrainingForward(model, train.objective)
    if ctx.enabled:
        if device.type == "cuda":
            # a conv stem's BatchNorm then normalises over the global batch, as one process would
            forward = convert_sync_batchnorm(forward)
        elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            warnings.warn(
                "BatchNorm statistics are per rank on CPU (SyncBatchNorm needs CUDA), so N processes no longer"
                " take exactly the steps of one process; train a conv-stem model on one process or on CUDA for that",
                stacklevel=2,
            )
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    if train.compile:
        forward = torch.compile(forward)
    writer = SummaryWriter(str(out_dir / "tb")) if ctx.is_main else None
    if writer is not None and start_epoch == 0:
        writer.add_text("config", f"```\n{asdict(train)}\n{model_config.to_dict()}\n```")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16")
    eval_model = ema.module if ema is not None else model
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, train.epochs):
        t0 = time.time()
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{train.epochs}", leave=False, disable=not ctx.is_main)
        # every rank reads the whole global batch: augmentation draws from the shared generator over all of it
        for i, batch in zip(bar, image_batches(x_train, train.batch_size, order), strict=True):
            index = order[i * train.batch_size : (i + 1) * train.batch_size]
            x = augment(batch, train.augment_shift, train.augment_flip, generator)
            targets = y_train[index]
            if train.mixup_alpha > 0:
                x, targets = mixup(x, targets, model_config.num_classes, train.mixup_alpha, generator)
            widths = sample_widths(model_config, len(index), train.full_width_share, generator)
            mine = ctx.shard(torch.arange(len(index)))
            with autocast:
                loss = training_loss(forward, x[mine].to(device), targets[mine].to(device), widths[mine],
                                     weights, train, normalizer=len(index) / ctx.world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            if writer is not None and i % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
        elapsed += time.time() - t0
        if ctx.is_main:
            accuracy = grid_accuracy(eval_model, head(x_val, train.eval_limit), y_val[: train.eval_limit],
                                     train.eval_batch_size)
            full, smallest = accuracy[-1, -1, -1].item(), accuracy[0, 0, 0].item()
            writer.add_scalar("val/acc_full", full, step)
            writer.add_scalar("val/acc_smallest", smallest, step)
            writer.add_scalar("val/acc_half_depth_full_tokens", accuracy[-1, model_config.depth // 2 - 1, -1].item(), step)
            writer.add_scalar("val/acc_grid_mean", accuracy.mean().item(), step)
            tqdm.write(f"epoch {epoch + 1}: loss {loss.item():.4f}  val full {100 * full:.2f}%  smallest {100 * smallest:.2f}%")
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "epoch": epoch + 1,
                "elapsed_s": elapsed,
                "settings": resume_settings(model_config, train, data),
            }
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            atomic_write(state_path, lambda tmp, state=state: torch.save(state, tmp))
        ctx.barrier()
    if not ctx.is_main:
        return {}
    writer.close()

    accuracy = grid_accuracy(eval_model, x_val, y_val, train.eval_batch_size)
    print(format_grid(model_config, accuracy))
    summary = {
        "split": "calibration",
        "n": len(y_val),
        **model_config.grid_axes(),
        "accuracy": accuracy.tolist(),
        "accuracy_layout": "[tokens][depth][width]",
        "full_accuracy": accuracy[-1, -1, -1].item(),
        "train_wall_s": round(elapsed, 1),
    }
    meta = {**(metadata or {}), "train": asdict(train), "train_wall_s": round(elapsed, 1)}
    save_checkpoint(eval_model, out_dir, meta, extra_files)
    write_json(out_dir / "grid_accuracy.json", summary)
    return summary
