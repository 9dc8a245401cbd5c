"""Images for inference: an ``.npz`` in the project's format, a folder of PNG/JPEG files, or a folder of class
subfolders (streamed from disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from backbone.config import AdaPerceiverConfig
from backbone.data import DataError, check_labels, read_npz, to_images
from backbone.folders import FolderSpec, ImageFiles, converted, scan_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_image(path: Path, config: AdaPerceiverConfig) -> np.ndarray:
    """uint8 ``(C, H, W)``: grey or RGB by ``config.in_chans``, resized to ``config.img_size``."""
    try:
        with Image.open(path) as image:
            image = converted(image, "L" if config.in_chans == 1 else "RGB")
            pixels = np.asarray(image.resize((config.img_size, config.img_size), Image.Resampling.BICUBIC), np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{path}: not a readable image ({reason}); remove it or save it again as PNG/JPEG") from err
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_images(path: str | Path, config: AdaPerceiverConfig,
                labels: bool = True) -> tuple[torch.Tensor, list[str], np.ndarray | None]:
    """Images ``(n, C, H, W)`` float32 in ``[0, 1]`` as the backbone expects, their names, and labels ``(n,)`` if any.

    ``path`` is a folder (its PNG/JPEG files in name order; names are the file names, no labels) or an ``.npz``
    with ``x`` (uint8 0..255 or float 0..1 images) and optionally ``y`` (labels; names are row indices).
    ``labels=False`` never reads ``y`` (calibration on unlabeled images).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no PNG or JPEG images")
        x = np.stack([_read_image(f, config) for f in files])
        return torch.from_numpy(to_images(x, str(path))), [f.name for f in files], None
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise DataError(f"{path}: give an .npz with 'x' (and optionally 'y') or a folder of PNG/JPEG images")
    arrays = read_npz(path, ("x",), ("y",) if labels else ())
    x = to_images(arrays["x"], str(path))
    expected = (config.in_chans, config.img_size, config.img_size)
    if x.shape[1:] != expected:
        raise DataError(f"{path}: images are {'x'.join(map(str, x.shape[1:]))} (channels x height x width), this "
                        f"backbone takes {'x'.join(map(str, expected))}; resize them, or export them as PNG/JPEG files "
                        "into a folder, which is resized on reading")
    y = arrays.get("y")
    labels = None if y is None else check_labels(y, len(x), str(path), config.num_classes)
    return torch.from_numpy(x), [str(i) for i in range(len(x))], labels


def has_class_folders(path: str | Path) -> bool:
    """A folder of class subfolders (the image-folder layout), not a folder of image files."""
    path = Path(path)
    return path.is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()) and any(
        p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def open_images(path: str | Path, config: AdaPerceiverConfig, classes: list[str] | None = None, workers: int = 2,
                labels: bool = True) -> tuple[torch.Tensor | ImageFiles, list[str], np.ndarray | None]:
    """``load_images``, except that a folder of class subfolders is streamed: its files as ``ImageFiles`` (read batch
    by batch, resized as the backbone was trained), their paths relative to ``path``, and labels ``(n,)`` by class
    folder name among ``classes`` (the backbone's class names; None when it has none, or with ``labels=False``)."""
    if not has_class_folders(path):
        return load_images(path, config, labels)
    scan = scan_folder(path, min_classes=1)
    entries = scan.pool + (scan.test or [])
    spec = FolderSpec(config.img_size, config.in_chans, workers)
    images = ImageFiles(scan.root, [name for name, _ in entries], spec)
    if not labels or classes is None:
        return images, images.files, None
    unknown = [name for name in scan.classes if name not in classes]
    if unknown:
        raise DataError(f"{Path(path) / unknown[0]}: class folder {unknown[0]!r} is not one of the backbone's classes "
                        f"({', '.join(classes)}); rename it, or give a folder of image files (no labels)")
    index = [classes.index(name) for name in scan.classes]
    return images, images.files, np.array([index[label] for _, label in entries], dtype=np.int64)
