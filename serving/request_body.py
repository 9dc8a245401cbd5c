"""The HTTP API's request bodies, parsed and checked: PNG/JPEG bytes, or JSON ``{"images": [...], "tolerance": t,
"full": false}``. Every problem is one ``RequestError`` with an HTTP status and one line that names the fix.

- ``image/png``, ``image/jpeg`` (or ``application/octet-stream``): the body is one image file, resized to the
  backbone's size as ``inference.inputs`` reads files; ``?tolerance=`` and ``?full=`` in the query.
- ``application/json``: ``images`` is a list of images, each a nested list ``(H, W)`` or ``(C, H, W)`` of floats
  in ``[0, 1]`` at the backbone's size, or a base64 string of a PNG/JPEG file.

``logits`` (true/false) asks for each image's logits in the response as well.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass

import numpy as np

from backbone.config import AdaPerceiverConfig
from backbone.data import DataError, to_images
from backbone.errors import ProjectError
from inference.inputs import _read_image

IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")


class RequestError(ProjectError):
    """A request the server refuses: ``status`` is its HTTP status (4xx), the message one line with the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ParsedRequest:
    """A checked request."""

    images: np.ndarray
    """``(B, C, H, W)`` float32 in ``[0, 1]``, finite."""
    tolerance: float | None
    """Disagreement allowed (%), None for the server's default operating point."""
    full: bool = False
    """Serve every image at the full configuration (no policy): the baseline a load test compares with."""
    logits: bool = False
    """Return each image's logits too."""


class _Body(io.BytesIO):
    """Image bytes that ``_read_image`` names as the request's image in its error message."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__  # PIL's message names the file by repr


def parse_request(body: bytes, content_type: str, query: dict[str, str], config: AdaPerceiverConfig,
                  max_images: int = 64, max_bytes: int = 16 << 20) -> ParsedRequest:
    """The checked request of an HTTP body; ``RequestError`` (400, 413 or 415) for anything else."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if not body:
        raise RequestError("empty request body; POST a PNG/JPEG image or JSON {\"images\": [...]}")
    if len(body) > max_bytes:
        raise RequestError(f"the body is {len(body)} bytes; this server takes at most {max_bytes}: split the batch",
                           status=413)
    if kind in IMAGE_TYPES:
        images = _image_file(body, "the request's image", config)[None]
        return ParsedRequest(images, _tolerance(query.get("tolerance")), _flag(query.get("full"), "full"),
                             _flag(query.get("logits"), "logits"))
    if kind != "application/json":
        raise RequestError(f"unsupported content type {kind or 'none'!r}; send image/png, image/jpeg or "
                           "application/json", status=415)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise RequestError(f"the body is not valid JSON ({reason}); send {{\"images\": [...]}}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list) or not payload["images"]:
        raise RequestError("JSON must be an object with a non-empty list \"images\" (each image a nested list of "
                           "floats in [0, 1] or a base64 PNG/JPEG string)")
    entries = payload["images"]
    if len(entries) > max_images:
        raise RequestError(f"{len(entries)} images in one request; this server takes at most {max_images}: split "
                           "the batch", status=413)
    images = np.stack([_entry(entry, i, config) for i, entry in enumerate(entries)])
    return ParsedRequest(images, _tolerance(payload.get("tolerance")), _flag(payload.get("full"), "full"),
                         _flag(payload.get("logits"), "logits"))


def _entry(entry, i: int, config: AdaPerceiverConfig) -> np.ndarray:
    """Image ``i`` of a JSON request as float32 ``(C, H, W)``."""
    name = f"image {i}"
    if isinstance(entry, str):
        try:
            data = base64.b64decode(entry, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{name} is a string but not base64; send a base64 PNG/JPEG or a nested list") from None
        return _image_file(data, name, config)
    try:
        x = np.asarray(entry, dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError(f"{name} is not a rectangular array of numbers; send (H, W) or (C, H, W) floats in [0, 1]") from None
    expected = (config.in_chans, config.img_size, config.img_size)
    if x.ndim == 2 and config.in_chans == 1:
        x = x[None]
    if x.shape != expected:
        raise RequestError(f"{name} has shape {x.shape}; this backbone takes {expected} (channels, height, width) "
                           "floats in [0, 1], or send a PNG/JPEG, which is resized")
    try:
        return to_images(x[None], name)[0]  # checks NaN, infinities and the [0, 1] range
    except DataError as err:
        raise RequestError(str(err)) from None


def _image_file(data: bytes, name: str, config: AdaPerceiverConfig) -> np.ndarray:
    """A PNG/JPEG file's bytes as float32 ``(C, H, W)`` in ``[0, 1]``, read as ``inference.inputs`` reads files."""
    try:
        return _read_image(_Body(data, name), config).astype(np.float32) / 255.0
    except DataError as err:
        raise RequestError(str(err).replace("; remove it or save it again as PNG/JPEG", "; send a PNG or JPEG file")) from None


def _tolerance(value) -> float | None:
    if value is None:
        return None
    try:
        tolerance = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        tolerance = math.nan
    if not math.isfinite(tolerance) or tolerance < 0:
        raise RequestError(f"tolerance must be a finite number of percent >= 0, got {value!r}")
    return tolerance


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise RequestError(f"{name} must be true or false, got {value!r}")
