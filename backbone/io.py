"""Atomic file writes: a kill never leaves half a file behind, nor a new file beside an old one it depends on."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from backbone.errors import ProjectError

ARTIFACT_NAMES = ("model.safetensors", "config.json", "policy.safetensors", "policy.json", "train_state.pt")
"""Files that belong to a checkpoint or a policy directory: never a report's output path."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_for(path: Path) -> str:
    """A fresh temporary file beside ``path`` (same filesystem, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; written files get the user's umask like any other
    return tmp


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files a killed write of ``path`` left behind."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a kill never leaves half a file."""
    write_file_set({Path(path): write})


def write_file_set(files: dict[Path, Callable[[str], object]]) -> None:
    """Write every file to a temporary name first, then rename them all into place.

    A kill while writing leaves every old file as it was (and only temporary files, removed by
    the next write); the renames come last and back to back. Readers that must not mix a new
    file with an old one check a digest recorded in one of them (``sha256_file``).
    """
    temps = {}
    try:
        for path, write in files.items():
            path = Path(path)
            remove_stale_temps(path)
            temps[path] = _temp_for(path)
            write(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def json_text(data: dict) -> str:
    """The project's JSON file format: indented, one trailing newline."""
    return json.dumps(data, indent=2) + "\n"


def write_text(path: str | Path, text: str) -> None:
    """``text`` into ``path``, atomically (a reader sees the old file or the new one, never part of one)."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json_text(data))


def sha256_file(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_path(path: str | Path | None, flag: str) -> None:
    """Refuse a report path (``--json``, ``--markdown``, ``--plot``) that would overwrite an artifact or a folder."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ProjectError(f"{flag} {path} is a folder; give a file path")
    if path.name in ARTIFACT_NAMES or path.suffix in (".safetensors", ".pt", ".npz"):
        raise ProjectError(f"{flag} {path} would overwrite an artifact; write the report to another file")
