"""Overlay drawings of pseudo labels (``pipeline inspect --image``)."""
from __future__ import annotations

import colorsys
from typing import Sequence

import cv2
import numpy as np


OVERLAP_COLOUR = (255, 255, 255)  # pixels that two or more labels claim


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours, well apart in hue (golden-ratio steps), stable for a given index."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues],
                    np.uint8).reshape(n, 3)


def overlay(image: np.ndarray, masks: Sequence[np.ndarray], boxes: np.ndarray, texts: Sequence[str],
            alpha: float = 0.5) -> np.ndarray:
    """Draw masks (blended, each instance in its own colour; pixels two masks share in `OVERLAP_COLOUR`), mask
    outlines, boxes and a caption per instance.

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
    claims = np.zeros(image.shape[:2], np.int32)
    for mask, colour in zip(masks, colours):
        if mask.shape != image.shape[:2]:
            raise ValueError(f"overlay: mask shape {mask.shape} differs from image {image.shape[:2]}")
        claims += mask
        out[mask] = (1 - alpha) * out[mask] + alpha * colour.astype(np.float32)
    # Labels resolved jointly never overlap; where they do (teacher.occlusion off), a blend of two colours would
    # hide it, so those pixels are painted in OVERLAP_COLOUR.
    shared = claims >= 2
    out[shared] = (1 - alpha) * image[shared].astype(np.float32) + alpha * np.asarray(OVERLAP_COLOUR, np.float32)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    for mask, box, text, colour in zip(masks, boxes, texts, colours):
        c = tuple(int(v) for v in colour)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, c, 1)
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), c, 2)
        cv2.putText(out, text, (x1, max(10, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, c, 1, cv2.LINE_AA)
    return out


def label_tile(image: np.ndarray, mask: np.ndarray, box: np.ndarray, caption: str, size: int = 192,
               context: float = 0.25) -> np.ndarray:
    """One label up close: the box grown by ``context`` of its side on each side, cropped from the image, the mask
    blended and outlined, the box drawn, scaled to fit ``size`` x ``size`` (letterboxed), a caption strip below.

    image (H,W,3) uint8 RGB, mask (H,W) bool, box (4,) x1,y1,x2,y2 px. Returns (size + 18, size, 3) uint8 RGB.
    """
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    pad_x, pad_y = context * max(x2 - x1, 1.0), context * max(y2 - y1, 1.0)
    c0, r0 = max(int(x1 - pad_x), 0), max(int(y1 - pad_y), 0)
    c1, r1 = min(int(np.ceil(x2 + pad_x)), width), min(int(np.ceil(y2 + pad_y)), height)
    c1, r1 = max(c1, c0 + 1), max(r1, r0 + 1)
    # Scaled first, drawn after: outlines and box stay one or two pixels wide however small the object.
    scale = size / max(r1 - r0, c1 - c0)
    new_w, new_h = max(1, round((c1 - c0) * scale)), max(1, round((r1 - r0) * scale))
    interp = cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA
    crop = cv2.resize(np.ascontiguousarray(image[r0:r1, c0:c1]), (new_w, new_h), interpolation=interp)
    small = cv2.resize(mask[r0:r1, c0:c1].astype(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST) > 0
    box_t = np.array([[(x1 - c0) * new_w / (c1 - c0), (y1 - r0) * new_h / (r1 - r0),
                       (x2 - c0) * new_w / (c1 - c0), (y2 - r0) * new_h / (r1 - r0)]], np.float32)
    resized = overlay(crop, [small], box_t, [""], alpha=0.4)
    tile = np.zeros((size + 18, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    tile[top:top + new_h, left:left + new_w] = resized
    cv2.putText(tile, caption[:32], (3, size + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def contact_sheet(tiles: Sequence[np.ndarray], columns: int = 6, gap: int = 4) -> np.ndarray:
    """Tiles of one shape (h,w,3) uint8 in rows of ``columns``, ``gap`` px apart, on grey. Returns (H,W,3) uint8."""
    if not tiles:
        raise ValueError("contact_sheet: no tiles")
    h, w = tiles[0].shape[:2]
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 64, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = t
    return sheet
