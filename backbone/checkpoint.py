"""Checkpoints: ``model.safetensors`` + ``config.json`` in one directory, written atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from backbone.config import AdaPerceiverConfig
from backbone.errors import ProjectError
from backbone.io import json_text, sha256_file, write_file_set
from backbone.model import AdaPerceiver

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ProjectError):
    """A checkpoint directory that is missing, truncated, or does not match its config."""


def save_checkpoint(model: AdaPerceiver, directory: str | Path, metadata: dict | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the model's weights and config (plus ``metadata``) into ``directory`` as one unit.

    ``config.json`` records the weights' sha256, and both files are renamed into place together
    (``backbone.io.write_file_set``), so a checkpoint whose files come from two writes is refused on load.
    ``extra_files`` (name -> bytes, e.g. an image folder's ``splits.json``) join the same unit; their readers
    check them against ``config.json`` by their own digests.
    """
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = save(state)
    config = {"architecture": model.config.to_dict(), **(metadata or {}),
              "weights_sha256": hashlib.sha256(weights).hexdigest()}
    files = {directory / name: lambda tmp, data=data: Path(tmp).write_bytes(data)
             for name, data in (extra_files or {}).items()}
    write_file_set({
        **files,
        directory / WEIGHTS: lambda tmp: Path(tmp).write_bytes(weights),
        directory / CONFIG: lambda tmp: Path(tmp).write_text(json_text(config)),
    })
    return directory


def verify_weights(directory: str | Path) -> None:
    """Refuse weights whose sha256 is not the one ``config.json`` records (altered, or from another write)."""
    directory = Path(directory)
    _, meta = read_config(directory)
    expected = meta.get("weights_sha256")
    path = directory / WEIGHTS
    if expected is not None and path.is_file() and sha256_file(path) != expected:
        raise CheckpointError(
            f"{path} is not the file {directory / CONFIG} was written with (changed since, or an interrupted "
            "write); restore the checkpoint or train it again"
        )


def read_config(directory: str | Path) -> tuple[AdaPerceiverConfig, dict]:
    """The architecture and the rest of ``config.json`` of a checkpoint directory."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a checkpoint directory holds {WEIGHTS} and {CONFIG}")
    try:
        data = json.loads(path.read_text())
        return AdaPerceiverConfig.from_dict(data.pop("architecture")), data
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid checkpoint config ({err}); restore it or train the "
                              "checkpoint again with experiments/train_backbone.py") from err


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> AdaPerceiver:
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` (no pickle), in eval mode."""
    directory = Path(directory)
    config, _ = read_config(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} not found; re-run experiments/train_backbone.py to produce it")
    verify_weights(directory)
    unreadable = f"{path}: unreadable or truncated safetensors file ({{}}); restore it or re-run experiments/train_backbone.py"
    try:
        # shapes from the header alone: a config that disagrees with the weights (an absurd embed_dim, say)
        # is refused before any model is allocated
        with safe_open(path, framework="pt") as f:
            found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(unreadable.format(" ".join(str(err).split()))) from err
    with torch.device("meta"):  # the config's shapes without allocating (or initialising) a single weight
        expected = {key: tuple(value.shape) for key, value in AdaPerceiver(config).state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        details = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else ""]
        details += [f"{k}: file {found[k]} vs config {expected[k]}" for k in wrong[:5]]
        raise CheckpointError(
            f"{path} does not match {directory / CONFIG}: " + "; ".join(d for d in details if d)
            + "; restore the checkpoint's own config.json or train it again"
        )
    try:
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(unreadable.format(" ".join(str(err).split()))) from err
    model = AdaPerceiver(config)
    model.load_state_dict(state)
    return model.to(device).eval()


def backbone_hash(directory: str | Path) -> str:
    """Content hash (sha256, hex) of a checkpoint's weights and architecture."""
    directory = Path(directory)
    config, _ = read_config(directory)
    verify_weights(directory)
    architecture = config.to_dict()
    if not architecture["stem_channels"]:
        # added after the first checkpoints shipped: it enters the hash only when set, so theirs stay valid
        del architecture["stem_channels"]
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
    with open(directory / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
