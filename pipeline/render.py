"""Overlay drawings of pseudo labels (``pipeline inspect --image``)."""
from __future__ import annotations

import colorsys
from typing import Sequence

import cv2
import numpy as np


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours, well apart in hue (golden-ratio steps), stable for a given index."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues],
                    np.uint8).reshape(n, 3)


def overlay(image: np.ndarray, masks: Sequence[np.ndarray], boxes: np.ndarray, texts: Sequence[str],
            alpha: float = 0.5) -> np.ndarray:
    """Draw masks (blended), mask outlines, boxes and a caption per instance.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: N masks, each (H, W) bool.
        boxes: (N, 4) float x1, y1, x2, y2 in pixels.
        texts: N captions, drawn above each box.
        alpha: mask opacity in [0, 1].
    Returns:
        (H, W, 3) uint8 RGB; ``image`` is not modified.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlay: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if not (len(masks) == len(boxes) == len(texts)):
        raise ValueError(f"overlay: {len(masks)} masks, {len(boxes)} boxes and {len(texts)} texts differ in number")
    out = image.astype(np.float32)
    colours = palette(len(masks))
    for mask, colour in zip(masks, colours):
        if mask.shape != image.shape[:2]:
            raise ValueError(f"overlay: mask shape {mask.shape} differs from image {image.shape[:2]}")
        out[mask] = (1 - alpha) * out[mask] + alpha * colour.astype(np.float32)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    for mask, box, text, colour in zip(masks, boxes, texts, colours):
        c = tuple(int(v) for v in colour)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, c, 1)
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), c, 2)
        cv2.putText(out, text, (x1, max(10, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, c, 1, cv2.LINE_AA)
    return out
