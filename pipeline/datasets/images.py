"""Reading dataset files with one-line errors: images, label/disparity PNGs, json, boxes.

Every failure is an ``InputError(path, problem)`` whose message names the file and says what is wrong
(missing, unreadable, corrupt, malformed), so the dataset loaders can record it as a ``Reject`` in lenient
mode or raise it in strict mode without further wrapping.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import cv2
import numpy as np

from ..errors import InputError


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; ``InputError`` when it is missing or cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None


def _decode(path: str | os.PathLike, flags: int) -> np.ndarray:
    # Decoding from bytes (rather than cv2.imread) separates "missing" from "corrupt" and works for any
    # path encoding.
    data = read_bytes(path)
    if not data:
        raise InputError(path, "unreadable image (empty file)")
    # OpenCV prints its own warnings (and libpng's) about a truncated file on the process's stderr; the
    # InputError below says it in one line, so they are silenced for the call.
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(min(level, cv2.utils.logging.LOG_LEVEL_ERROR))
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if image is None or image.size == 0:
        raise InputError(path, "unreadable image (corrupt or not an image format OpenCV can decode)")
    return image


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grey images are replicated, alpha is dropped)."""
    image = _decode(path, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(image[:, :, ::-1])


def read_png_channel(path: str | os.PathLike, dtype: type = np.uint16) -> np.ndarray:
    """A single-channel label or disparity PNG as (H, W) ``dtype``, values unchanged (no scaling).

    8-bit files are widened to ``dtype`` (Cityscapes stores labelIds as 8-bit and instanceIds/disparity as
    16-bit); a colour image or a deeper type than ``dtype`` is an error.
    """
    image = _decode(path, cv2.IMREAD_UNCHANGED)
    if image.ndim != 2:
        raise InputError(path, f"expected a single-channel image, got {image.shape[2]} channels")
    if np.iinfo(image.dtype).max > np.iinfo(dtype).max:
        raise InputError(path, f"expected at most {np.dtype(dtype).name} values, got {image.dtype.name}")
    return image.astype(dtype, copy=False)


def read_json(path: str | os.PathLike) -> Any:
    """Parsed json; ``InputError`` for a missing file, non-UTF-8 text or malformed json (with line/column)."""
    data = read_bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(path, "malformed json: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"malformed json at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def format_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def validate_box(box: Sequence[float], width: int, height: int, where: str | os.PathLike,
                 min_side: float = 0.0, tolerance: float = 0.5) -> np.ndarray:
    """Check an x1, y1, x2, y2 pixel box against an image of ``width`` x ``height``.

    Returns the box as (4,) float32, clipped to the image when it pokes out by at most ``tolerance`` px
    (float round-off in annotation tools); raises ``InputError(where, ...)`` naming the box when it is not
    four finite numbers, has x2 <= x1 or y2 <= y1 (or a side below ``min_side``), or lies outside the image.
    """
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise InputError(where, f"box {box!r} is not a list of numbers") from None
    if len(values) != 4:
        raise InputError(where, f"box {format_box(values)} must have 4 values x1, y1, x2, y2")
    if not all(math.isfinite(v) for v in values):
        raise InputError(where, f"box {format_box(values)} has a non-finite coordinate")
    x1, y1, x2, y2 = values
    text = format_box(values)
    if x2 <= x1:
        raise InputError(where, f"box {text} has x2 <= x1")
    if y2 <= y1:
        raise InputError(where, f"box {text} has y2 <= y1")
    if x2 - x1 < min_side or y2 - y1 < min_side:
        raise InputError(where, f"box {text} is thinner than {min_side:g} px")
    if (x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance
            or x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0):
        raise InputError(where, f"box {text} lies outside the {width}x{height} image")
    return np.array([max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))], np.float32)
