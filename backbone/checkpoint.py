"""Checkpoints: ``model.safetensors`` + ``config.json`` in one directory, written atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from backbone.config import AdaPerceiverConfig
from backbone.io import atomic_write, write_json
from backbone.model import AdaPerceiver

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, truncated, or does not match its config."""


def save_checkpoint(model: AdaPerceiver, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write the model's weights and config (plus ``metadata``) into ``directory``."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, tmp))
    write_json(directory / CONFIG, {"architecture": model.config.to_dict(), **(metadata or {})})
    return directory


def read_config(directory: str | Path) -> tuple[AdaPerceiverConfig, dict]:
    """The architecture and the rest of ``config.json`` of a checkpoint directory."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a checkpoint directory holds {WEIGHTS} and {CONFIG}")
    try:
        data = json.loads(path.read_text())
        return AdaPerceiverConfig.from_dict(data.pop("architecture")), data
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid checkpoint config ({err})") from err


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> AdaPerceiver:
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` (no pickle), in eval mode."""
    directory = Path(directory)
    config, _ = read_config(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} not found; re-run experiments/train_backbone.py to produce it")
    try:
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({err})") from err
    model = AdaPerceiver(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else ""]
        details += [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}" for k in wrong[:5]]
        raise CheckpointError(f"{path} does not match {directory / CONFIG}: " + "; ".join(d for d in details if d))
    model.load_state_dict(state)
    return model.to(device).eval()


def backbone_hash(directory: str | Path) -> str:
    """Content hash (sha256, hex) of a checkpoint's weights and architecture."""
    directory = Path(directory)
    config, _ = read_config(directory)
    architecture = config.to_dict()
    if not architecture["stem_channels"]:
        # added after the first checkpoints shipped: it enters the hash only when set, so theirs stay valid
        del architecture["stem_channels"]
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
    with open(directory / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
