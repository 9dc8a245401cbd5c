"""Images for inference: an ``.npz`` in the project's format or a folder of PNG/JPEG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backbone.config import AdaPerceiverConfig
from backbone.data import DataError, check_labels, to_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_images(path: str | Path, config: AdaPerceiverConfig) -> tuple[torch.Tensor, list[str], np.ndarray | None]:
    """Images ``(n, C, H, W)`` in ``[0, 1]`` as the backbone expects, their names, and labels if the file has them.

    A folder's images are converted to grey or RGB by ``config.in_chans`` and resized to ``config.img_size``.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no PNG or JPEG images")
        mode = "L" if config.in_chans == 1 else "RGB"
        arrays = [np.asarray(Image.open(f).convert(mode).resize((config.img_size, config.img_size)), dtype=np.uint8)
                  for f in files]
        x = np.stack(arrays)
        x = x[:, None] if config.in_chans == 1 else x.transpose(0, 3, 1, 2)
        return torch.from_numpy(to_images(x, str(path))), [f.name for f in files], None
    if path.suffix != ".npz" or not path.is_file():
        raise DataError(f"{path}: give an .npz with 'x' (and optionally 'y') or a folder of PNG/JPEG images")
    with np.load(path, allow_pickle=False) as arrays:
        if "x" not in arrays.files:
            raise DataError(f"{path}: missing array 'x' (images)")
        x = to_images(arrays["x"], str(path))
        labels = check_labels(arrays["y"], len(x), str(path), config.num_classes) if "y" in arrays.files else None
    return torch.from_numpy(x), [str(i) for i in range(len(x))], labels
