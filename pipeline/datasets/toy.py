"""Generated street scenes in the real Cityscapes layout (``pipeline make-toy``, ``--dataset toy``).

Each image is a small 3-D scene seen by a Cityscapes-like stereo camera (baseline 0.209313 m, fx 2262.52
px at 2048 px width, zero pitch, 1.22 m above the road): a road and sidewalks on the ground plane, building
and vegetation facades along both sides and across the far end, sky above. Objects of the 8 instance
classes stand on the ground; their image height follows from their depth (h = fy * H / Z) and their
bottom row from the ground plane (v = v0 + fy * camera_height / Z), so size and depth agree. Every pixel
has a true depth (sky has none); the disparity PNG stores p = round(256 * baseline * fx / Z + 1) with
p = 0 for sky, for a few random holes and for the band at the left border a stereo matcher cannot see.

What makes the scenes hard: textured background and objects; outlines that are not boxes (cars with
cabins and wheels, people with head, arms and legs, wheeled bikes); objects sorted far to near so nearer
ones occlude farther ones (the json lists them in that drawing order, as Cityscapes does); objects cut by
the image border; objects below 32 px; one "camouflaged" object per image whose colour is the background
colour behind it, so that only depth separates them; occasional ``cargroup`` / ``persongroup`` regions
(several overlapping objects annotated as one ignore polygon). The labelIds / instanceIds PNGs are
rasterised from the written polygons with the same code the loader uses, so json and PNGs agree exactly.

Output is a pure function of (seed, split, index, size) and ``GENERATOR_VERSION``: the same arguments give
the same bytes. ``toy.json`` at the root records what was generated (``toy_manifest``), so ``make-toy`` can
tell a re-run from a different dataset, and the cache folder name carries the generator version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from tqdm import tqdm

from ..config import ToyConfig
from ..errors import ConfigError, InputError
from .cityscapes import INSTANCE_LABEL_IDS, label_id, paint_polygons

log = logging.getLogger(__name__)

BASELINE = 0.209313          # metres, Cityscapes stereo rig
FX_2048 = 2262.52            # pixels at 2048 px image width
FY_2048 = 2265.30
U0_2048 = 1096.98
V0_1024 = 513.137
CAMERA_HEIGHT = 1.22         # metres above the road
CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster")}
FRAME = 19                   # Cityscapes annotates the 20th frame of each snippet
# Bump whenever the generator's output changes for the same arguments: the cache folder name carries it (so
# stale cached data is never reused) and so does toy.json (so make-toy does not mix versions in a folder).
GENERATOR_VERSION = 1
TOY_MANIFEST = "toy.json"
# The folders a toy dataset consists of (what ``make-toy --overwrite`` deletes).
TOY_TREES = ("leftImg8bit", "gtFine", "disparity", "camera")

# (height, width) in metres of the object as seen; "side" / "rear" variants for vehicles.
_SIZES = {
    "person": (1.72, 0.62), "rider": (1.75, 0.75), "bicycle": (1.05, 1.75), "motorcycle": (1.2, 2.0),
    "car": (1.5, 4.3), "car_rear": (1.5, 1.8), "truck": (3.3, 7.5), "truck_rear": (3.3, 2.5),
    "bus": (3.2, 11.0), "bus_rear": (3.2, 2.6), "train": (3.7, 18.0),
}
_CLASS_WEIGHTS = {"car": 0.34, "person": 0.24, "rider": 0.09, "bicycle": 0.07, "motorcycle": 0.07,
                  "truck": 0.07, "bus": 0.07, "train": 0.05}
_MIN_VISIBLE_PX = 12         # objects left with fewer visible pixels are not annotated (nor drawn)


@dataclass(frozen=True)
class Camera:
    fx: float
    fy: float
    u0: float
    v0: float
    baseline: float = BASELINE
    height: float = CAMERA_HEIGHT

    @staticmethod
    def for_size(height: int, width: int) -> "Camera":
        """Cityscapes intrinsics scaled to the image size."""
        scale = width / 2048.0
        return Camera(FX_2048 * scale, FY_2048 * scale, U0_2048 * scale, V0_1024 * height / 1024.0)

    def to_json(self) -> dict:
        return {"extrinsic": {"baseline": self.baseline, "pitch": 0.0, "roll": 0.0, "x": 1.7, "y": 0.0,
                              "yaw": 0.0, "z": self.height},
                "intrinsic": {"fx": self.fx, "fy": self.fy, "u0": self.u0, "v0": self.v0}}


@dataclass
class Scene:
    """One rendered image with everything the files are written from.

    image (H, W, 3) uint8 RGB; depth (H, W) float32 true metres (0 where there is none, i.e. sky);
    disparity (H, W) uint16 Cityscapes encoding; objects: json objects ({"label", "polygon"}) in drawing
    order; label_ids (H, W) uint8 and instance_ids (H, W) uint16 rasterised from ``objects``.
    """

    image: np.ndarray
    depth: np.ndarray
    disparity: np.ndarray
    objects: list[dict]
    label_ids: np.ndarray
    instance_ids: np.ndarray
    camera: Camera


@dataclass
class _Thing:
    """An object (or group of objects) placed in the scene before rendering."""

    label: str                     # json label, e.g. "car" or "cargroup"
    depth: float                   # metres
    parts: list[tuple[str, float, float]]   # (shape kind, centre u px, bottom v px) drawn into one outline
    scale: float                   # pixels per metre at this depth (fy / Z)
    camouflage: bool = False
    polygon: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))


def parse_size(text: str, where: str = "dataset.toy.size") -> tuple[int, int]:
    """'HxW' -> (H, W); ``ConfigError(where, ...)`` naming the value otherwise."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError(where, f"'{text}' is not HxW, e.g. 256x512") from None
    if h < 32 or w < 32:
        raise ConfigError(where, f"'{text}' is too small (at least 32x32)")
    return h, w


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of the other images and of the dataset size."""
    split_code = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))


# ---------------------------------------------------------------------------------------------- background

_SKY_TOP = np.array([110, 150, 215], np.float32)
_SKY_LOW = np.array([200, 215, 235], np.float32)
_WINDOW_TINT = np.array([20, 30, 45], np.float32)
_LEAVES = np.array([60, 110, 45], np.float32)
_ASPHALT = np.array([95, 95, 100], np.float32)
_ROAD_PAINT = np.array([225, 225, 215], np.float32)
_PAVEMENT = np.array([160, 150, 140], np.float32)

def _lowfreq(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """(H, W) float32 smooth noise in about [-1, 1]: a coarse random grid, bicubically upsampled."""
    grid = rng.standard_normal((max(2, cells * height // width), cells)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, cam: Camera, height: int, width: int):
    """Street canyon: returns (rgb float32 (H,W,3), depth float32 (H,W) with 0 for sky, label map dict
    name -> (H, W) bool)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = u + 0.5, v + 0.5
    road_half = rng.uniform(3.5, 7.0)
    walls = (-(road_half + rng.uniform(2.5, 5.0)), road_half + rng.uniform(2.5, 5.0))
    far = rng.uniform(70.0, 160.0)

    below = v > cam.v0
    z_ground = np.where(below, cam.fy * cam.height / np.maximum(v - cam.v0, 1e-3), np.inf)
    x_ground = (u - cam.u0) * z_ground / cam.fx
    side = np.where(u < cam.u0, walls[0], walls[1])
    with np.errstate(divide="ignore"):
        z_side = cam.fx * side / (u - cam.u0)
    z_wall = np.minimum(np.where(z_side > 0, z_side, np.inf), far)
    on_end_wall = z_wall >= far
    y_wall = cam.height - (v - cam.v0) * z_wall / cam.fy          # height above the road where the ray hits

    # Facade segments along the street (side walls) and across it (end wall): building or vegetation.
    def segments(length_range, start, stop):
        edges = [start]
        while edges[-1] < stop:
            edges.append(edges[-1] + rng.uniform(*length_range))
        n = len(edges)
        return (np.array(edges), rng.uniform(6.0, 26.0, n), rng.random(n) < 0.3,
                rng.uniform(60, 200, (n, 3)), rng.uniform(2.5, 4.5, n))

    side_seg = [segments((8.0, 25.0), 0.0, far) for _ in range(2)]
    end_seg = segments((6.0, 20.0), walls[0] - 60.0, walls[1] + 60.0)
    along = np.where(on_end_wall, (u - cam.u0) * far / cam.fx, z_wall)
    wall_top = np.zeros((height, width), np.float32)
    is_veg = np.zeros((height, width), bool)
    wall_rgb = np.zeros((height, width, 3), np.float32)
    window_period = np.zeros((height, width), np.float32)
    for mask, (edges, tops, veg, colours, periods) in (
            (~on_end_wall & (u < cam.u0), side_seg[0]), (~on_end_wall & (u >= cam.u0), side_seg[1]),
            (on_end_wall, end_seg)):
        idx = np.clip(np.searchsorted(edges, along[mask]) - 1, 0, len(edges) - 1)
        wall_top[mask] = tops[idx]
        is_veg[mask] = veg[idx]
        wall_rgb[mask] = colours[idx]
        window_period[mask] = periods[idx]
    ground = np.isfinite(z_ground) & (z_ground < z_wall)
    wall = ~ground & (y_wall >= 0) & (y_wall <= wall_top)
    sky = ~ground & ~wall
    road = ground & (np.abs(x_ground) <= road_half)
    building = wall & ~is_veg
    veg = wall & is_veg
    walk = ground & ~road

    tex = _lowfreq(rng, height, width, 24)
    clouds = _lowfreq(rng, height, width, 8)
    leaves = _lowfreq(rng, height, width, 64)
    rgb = np.empty((height, width, 3), np.float32)

    def paint(mask, colour_of):
        # Texture formulas run on the region's pixels only: a 1024x2048 frame has 2M of them.
        idx = np.nonzero(mask)
        rgb[idx] = colour_of(idx)

    def sky_colour(idx):                      # vertical gradient with clouds
        t = (v[idx] / height)[:, None]
        return (1 - t) * _SKY_TOP + t * _SKY_LOW + 18 * clouds[idx][:, None]

    def facade_colour(idx):                   # window grid in facade coordinates: perspective-correct
        y, period = y_wall[idx], window_period[idx]
        floors = np.mod(y, 3.2) / 3.2
        cols = np.mod(along[idx], period) / period
        window = (floors > 0.3) & (floors < 0.8) & (cols > 0.25) & (cols < 0.75) & (y > 3.0)
        base = wall_rgb[idx] * (1 + 0.08 * tex[idx])[:, None]
        return np.where(window[:, None], base * 0.35 + _WINDOW_TINT, base)

    def leaves_colour(idx):
        return _LEAVES * (1 + 0.35 * leaves[idx])[:, None]

    def road_colour(idx):                     # asphalt, dashed centre line, edge lines
        x, z = x_ground[idx], z_ground[idx]
        centre = (np.abs(x) < 0.08) & (np.mod(z, 9.0) < 4.0)
        paint_line = centre | (np.abs(np.abs(x) - road_half + 0.2) < 0.08)
        return np.where(paint_line[:, None], _ROAD_PAINT, _ASPHALT * (1 + 0.1 * tex[idx])[:, None])

    def pavement_colour(idx):                 # sidewalk tiles
        tiles = (np.mod(x_ground[idx], 0.8) < 0.05) | (np.mod(z_ground[idx], 0.8) < 0.05)
        return _PAVEMENT * np.where(tiles, 0.8, 1.0)[:, None]

    for mask, colour_of in ((sky, sky_colour), (building, facade_colour), (veg, leaves_colour),
                            (road, road_colour), (walk, pavement_colour)):
        paint(mask, colour_of)
    rgb += 5.0 * rng.standard_normal((height, width, 3), dtype=np.float32)

    depth = np.where(ground, z_ground, np.where(wall, z_wall, 0.0)).astype(np.float32)
    labels = {"sky": sky, "building": building, "vegetation": veg, "sidewalk": walk, "road": road}
    return rgb, depth, labels, (walls, road_half)


# -------------------------------------------------------------------------------------------- object shapes

_SHIFT = 4                    # cv2 fixed-point bits: sub-pixel shapes for small objects


def _pt(to_px, x, y) -> tuple[int, int]:
    px, py = to_px(x, y)
    return int(round(px * (1 << _SHIFT))), int(round(py * (1 << _SHIFT)))


def _poly(mask, rgb, to_px, points, colour):
    pts = np.array([_pt(to_px, x, y) for x, y in points], np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [pts], 255, cv2.LINE_8, _SHIFT)
    cv2.fillPoly(rgb, [pts], colour.tolist(), cv2.LINE_8, _SHIFT)


def _disc(mask, rgb, to_px, x, y, radius_px, colour):
    centre = _pt(to_px, x, y)
    r = max(1, int(round(radius_px * (1 << _SHIFT))))
    cv2.circle(mask, centre, r, 255, -1, cv2.LINE_8, _SHIFT)
    cv2.circle(rgb, centre, r, colour.tolist(), -1, cv2.LINE_8, _SHIFT)


def _bar(mask, rgb, to_px, a, b, thickness_px, colour):
    # cv2.line takes an integer thickness: draw thin bars as quads instead.
    (ax, ay), (bx, by) = to_px(*a), to_px(*b)
    dx, dy = by - ay, ax - bx
    norm = max(np.hypot(dx, dy), 1e-6)
    ox, oy = dx / norm * thickness_px / 2, dy / norm * thickness_px / 2
    pts = np.array([[ax + ox, ay + oy], [bx + ox, by + oy], [bx - ox, by - oy], [ax - ox, ay - oy]])
    pts = np.round(pts * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [pts], 255, cv2.LINE_8, _SHIFT)
    cv2.fillPoly(rgb, [pts], colour.tolist(), cv2.LINE_8, _SHIFT)


def _rounded_rect(x1, y1, x2, y2, r_x, r_y, n=5):
    """Outline points of a rectangle with elliptic corners, in the shape's local units."""
    pts = []
    for cx, cy, start in ((x2 - r_x, y2 - r_y, 0.0), (x1 + r_x, y2 - r_y, 0.5 * np.pi),
                          (x1 + r_x, y1 + r_y, np.pi), (x2 - r_x, y1 + r_y, 1.5 * np.pi)):
        for a in np.linspace(start, start + 0.5 * np.pi, n):
            pts.append((cx + r_x * np.cos(a), cy + r_y * np.sin(a)))
    return pts


_DARK = np.array([25, 25, 28], np.float64)
_GLASS = np.array([40, 55, 70], np.float64)


def _draw_vehicle_side(mask, rgb, to_px, h_px, colour, wheels, cabin):
    """Side view: rounded body, cabin with windows (if ``cabin``), wheels at the given local x."""
    body_top = 0.55 if cabin else 0.97
    _poly(mask, rgb, to_px, _rounded_rect(-0.5, 0.12, 0.5, body_top, 0.06, 0.12), colour)
    if cabin:
        _poly(mask, rgb, to_px, [(-0.33, 0.5), (0.3, 0.5), (0.14, 0.97), (-0.22, 0.97)], colour * 0.95)
        _poly(mask, rgb, to_px, [(-0.29, 0.58), (-0.03, 0.58), (-0.03, 0.9), (-0.2, 0.9)], _GLASS)
        _poly(mask, rgb, to_px, [(0.0, 0.58), (0.25, 0.58), (0.12, 0.9), (0.0, 0.9)], _GLASS)
    else:
        _poly(mask, rgb, to_px, [(-0.46, 0.55), (0.46, 0.55), (0.46, 0.85), (-0.46, 0.85)], _GLASS)
    for x in wheels:
        _disc(mask, rgb, to_px, x, 0.13, 0.13 * h_px, _DARK)
        _disc(mask, rgb, to_px, x, 0.13, 0.06 * h_px, np.array([150, 150, 150.0]))


def _draw_vehicle_rear(mask, rgb, to_px, h_px, colour, cabin):
    """Rear view: body, cabin or box with a window, tyres and tail lights."""
    top = 0.6 if cabin else 0.97
    _poly(mask, rgb, to_px, _rounded_rect(-0.5, 0.1, 0.5, top, 0.08, 0.08), colour)
    if cabin:
        _poly(mask, rgb, to_px, [(-0.43, 0.57), (0.43, 0.57), (0.33, 0.97), (-0.33, 0.97)], colour * 0.95)
        _poly(mask, rgb, to_px, [(-0.36, 0.63), (0.36, 0.63), (0.29, 0.9), (-0.29, 0.9)], _GLASS)
    else:
        _poly(mask, rgb, to_px, [(-0.42, 0.6), (0.42, 0.6), (0.42, 0.88), (-0.42, 0.88)], _GLASS)
    for x in (-0.38, 0.38):
        _poly(mask, rgb, to_px, [(x - 0.09, 0.0), (x + 0.09, 0.0), (x + 0.09, 0.14), (x - 0.09, 0.14)], _DARK)
        _poly(mask, rgb, to_px, [(x - 0.07, 0.4), (x + 0.07, 0.4), (x + 0.07, 0.47), (x - 0.07, 0.47)],
              np.array([200, 30, 30.0]))


def _draw_person(mask, rgb, to_px, h_px, colour, rng, riding=False):
    """Head, torso, arms and legs; ``riding`` bends the legs and leans the torso forward."""
    legs = colour[::-1] * 0.6
    skin = np.array([205, 160, 130.0]) * rng.uniform(0.6, 1.1)
    if riding:
        for side in (-1, 1):
            _bar(mask, rgb, to_px, (0.0, 0.55), (0.25 * side + 0.2, 0.38), 0.1 * h_px, legs)
            _bar(mask, rgb, to_px, (0.25 * side + 0.2, 0.38), (0.15 * side + 0.05, 0.2), 0.08 * h_px, legs)
        _bar(mask, rgb, to_px, (0.0, 0.55), (0.25, 0.83), 0.17 * h_px, colour)
        _bar(mask, rgb, to_px, (0.22, 0.8), (0.5, 0.6), 0.06 * h_px, colour * 0.9)
        _disc(mask, rgb, to_px, 0.32, 0.91, 0.065 * h_px, skin)
        return
    stride = rng.uniform(0.05, 0.3)
    for side in (-1, 1):
        _bar(mask, rgb, to_px, (0.12 * side, 0.5), (stride * side, 0.0), 0.075 * h_px, legs)
    _poly(mask, rgb, to_px, _rounded_rect(-0.32, 0.46, 0.32, 0.83, 0.1, 0.05), colour)
    for side in (-1, 1):
        _bar(mask, rgb, to_px, (0.3 * side, 0.8), (0.42 * side, 0.5), 0.07 * h_px, colour * 0.9)
    _bar(mask, rgb, to_px, (0.0, 0.8), (0.0, 0.86), 0.06 * h_px, skin)
    _disc(mask, rgb, to_px, 0.0, 0.92, 0.07 * h_px, skin)


def _draw_bike(mask, rgb, to_px, h_px, colour, motor=False):
    """Two wheels joined by a frame (bicycle) or a body (motorcycle)."""
    r = 0.3
    for x in (-0.33, 0.33):
        _disc(mask, rgb, to_px, x, r, r * h_px, _DARK)
        _disc(mask, rgb, to_px, x, r, (r - 0.07) * h_px, np.array([70, 70, 72.0]) if not motor else _DARK * 2)
    if motor:
        _poly(mask, rgb, to_px, _rounded_rect(-0.3, 0.3, 0.32, 0.72, 0.1, 0.12), colour)
        _poly(mask, rgb, to_px, [(-0.35, 0.68), (0.05, 0.68), (0.05, 0.8), (-0.3, 0.8)], _DARK)
        _bar(mask, rgb, to_px, (0.25, 0.7), (0.3, 0.97), 0.06 * h_px, _DARK)
    else:
        thick = max(0.05 * h_px, 1.0)
        for a, b in (((-0.33, r), (-0.05, 0.72)), ((-0.05, 0.72), (0.25, 0.72)), ((0.25, 0.72), (0.33, r)),
                     ((-0.33, r), (0.0, r)), ((0.0, r), (-0.05, 0.72)), ((0.0, r), (0.25, 0.72)),
                     ((0.25, 0.72), (0.28, 0.95)), ((-0.05, 0.72), (-0.08, 0.85))):
            _bar(mask, rgb, to_px, a, b, thick, colour)


def _shape_painter(kind: str, rng: np.random.Generator):
    if kind in ("car", "truck", "bus", "train"):
        wheels = {"car": (-0.31, 0.31), "truck": (-0.38, -0.2, 0.35), "bus": (-0.35, 0.33),
                  "train": (-0.42, -0.3, 0.3, 0.42)}[kind]
        return lambda m, c, t, h, col: _draw_vehicle_side(m, c, t, h, col, wheels, kind == "car")
    if kind.endswith("_rear"):
        return lambda m, c, t, h, col: _draw_vehicle_rear(m, c, t, h, col, kind == "car_rear")
    if kind == "person":
        return lambda m, c, t, h, col: _draw_person(m, c, t, h, col, rng)
    if kind == "rider":
        return lambda m, c, t, h, col: _draw_person(m, c, t, h, col, rng, riding=True)
    return lambda m, c, t, h, col: _draw_bike(m, c, t, h, col, motor=kind == "motorcycle")


def _base_class(kind: str) -> str:
    return kind[: -len("_rear")] if kind.endswith("_rear") else kind


def _paint_thing(thing: _Thing, rng: np.random.Generator, height: int, width: int):
    """Draw a thing's parts into an image-size crop; returns (x0, y0, mask uint8, rgb float) or None."""
    boxes = []
    for kind, uc, vb in thing.parts:
        h_m, w_m = _SIZES[kind]
        boxes.append((uc - w_m * thing.scale / 2, vb - h_m * thing.scale, uc + w_m * thing.scale / 2, vb))
    boxes = np.array(boxes)
    x0, y0 = max(int(np.floor(boxes[:, 0].min())) - 2, 0), max(int(np.floor(boxes[:, 1].min())) - 2, 0)
    x1 = min(int(np.ceil(boxes[:, 2].max())) + 2, width)
    y1 = min(int(np.ceil(boxes[:, 3].max())) + 2, height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    rgb = np.zeros((y1 - y0, x1 - x0, 3), np.float64)
    for (kind, uc, vb), colour in zip(thing.parts, _part_colours(thing, rng)):
        h_m, w_m = _SIZES[kind]
        h_px, w_px = h_m * thing.scale, w_m * thing.scale

        def to_px(x, y, uc=uc, vb=vb, w_px=w_px, h_px=h_px):
            return uc + x * w_px - x0 - 0.5, vb - y * h_px - y0 - 0.5

        _shape_painter(kind, rng)(mask, rgb, to_px, h_px, colour)
    return x0, y0, mask, rgb


def _part_colours(thing: _Thing, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in thing.parts:
        if rng.random() < 0.3:
            grey = rng.uniform(30, 230)
            out.append(np.array([grey, grey, grey]) * rng.uniform(0.9, 1.1, 3))
        else:
            out.append(rng.uniform(20, 240, 3))
    return out


def _outline(mask: np.ndarray, x0: int, y0: int) -> np.ndarray | None:
    """(P, 2) int32 image-coordinate outline of the largest blob of a crop mask (holes filled)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    contour = cv2.approxPolyDP(contour, 0.7, True) if len(contour) > 8 else contour
    return contour.reshape(-1, 2).astype(np.int32) + np.array([x0, y0], np.int32)


# ---------------------------------------------------------------------------------------------- placement

def _place(rng: np.random.Generator, cam: Camera, height: int, width: int, walls, road_half) -> list[_Thing]:
    """Choose the scene's objects: their class, ground position and depth, including the hard cases."""
    names = list(_CLASS_WEIGHTS)
    probs = np.array([_CLASS_WEIGHTS[n] for n in names])
    probs /= probs.sum()
    things: list[_Thing] = []

    def add(label: str, x: float, z: float, parts: list[tuple[str, float]] | None = None) -> _Thing:
        scale = cam.fy / z
        vb = cam.v0 + cam.fy * cam.height / z
        uc = cam.u0 + cam.fx * x / z
        kinds = parts or [(_variant(label, rng), 0.0)]
        thing = _Thing(label, z, [(k, uc + dx * scale, vb) for k, dx in kinds], scale)
        things.append(thing)
        return thing

    def lateral(z: float, name: str) -> float:
        half = _SIZES[name][1] / 2
        lo, hi = walls[0] + 0.6, walls[1] - 0.6
        if name in ("car", "truck", "bus", "train"):
            lo, hi = -road_half + 1.2, road_half - 1.2
        return float(rng.uniform(lo + half * 0.2, hi - half * 0.2))

    count = int(rng.integers(5, 10))
    for _ in range(count):
        name = str(rng.choice(names, p=probs))
        # Big vehicles keep their distance, so that one does not fill the frame.
        z = float(np.exp(rng.uniform(np.log(max(6.0, 3.5 * _SIZES[name][0])), np.log(60.0))))
        x = lateral(z, name)
        add(name, x, z)
        if name == "rider":                        # a rider sits on a bike annotated separately
            add("bicycle" if rng.random() < 0.6 else "motorcycle", x, z + 0.05)
    # Occlusion: a nearer object partly in front of an existing one.
    target = things[int(rng.integers(len(things)))]
    z = max(target.depth * rng.uniform(0.6, 0.9), 4.5)
    x_t = (target.parts[0][1] - cam.u0) * target.depth / cam.fx
    add(str(rng.choice(["person", "car"])), x_t + rng.uniform(-1.0, 1.0), z)
    # Cut by the image border: straddling the left or right edge.
    z = float(rng.uniform(5.0, 15.0))
    edge_u = 0.0 if rng.random() < 0.5 else float(width)
    add(str(rng.choice(["car", "person", "bus"])), (edge_u - cam.u0) * z / cam.fx, z)
    # Small objects (< 32 px): far away.
    for _ in range(2):
        name = str(rng.choice(["person", "car", "bicycle"]))
        z = cam.fy * _SIZES[_variant(name, rng)][0] / rng.uniform(8.0, 28.0)
        add(name, lateral(z, name), z)
    # Colour-ambiguous: a mid-range object painted in the colour of what lies behind it.
    z = float(rng.uniform(8.0, 25.0))
    add(str(rng.choice(["car", "person", "bicycle"])), lateral(z, "car"), z).camouflage = True
    # Occasionally a group region (ignored in training and evaluation).
    if rng.random() < 0.4:
        kind = "car" if rng.random() < 0.5 else "person"
        z = float(rng.uniform(25.0, 50.0))
        variant = _variant(kind, rng)
        step = _SIZES[variant][1] * 0.6
        members = [(variant, i * step) for i in range(int(rng.integers(3, 6)))]
        add(kind + "group", lateral(z, kind), z, members)
    things.sort(key=lambda t: -t.depth)            # drawing order: far to near
    return things


def _variant(name: str, rng: np.random.Generator) -> str:
    if name in ("car", "truck", "bus") and rng.random() < 0.4:
        return name + "_rear"
    return name


# ------------------------------------------------------------------------------------------------ render

def render_scene(seed: int, split: str, index: int, size: tuple[int, int] = (256, 512)) -> Scene:
    """The scene of image ``index`` of ``split`` for ``seed`` at ``size`` (H, W)."""
    height, width = size
    rng = image_rng(seed, split, index)
    cam = Camera.for_size(height, width)
    rgb, depth, stuff, (walls, road_half) = _background(rng, cam, height, width)
    things = _place(rng, cam, height, width, walls, road_half)

    painted = []
    for thing in things:
        drawn = _paint_thing(thing, rng, height, width)
        if drawn is None:
            continue
        x0, y0, mask, colours = drawn
        polygon = _outline(mask, x0, y0)
        if polygon is None or len(polygon) < 3:
            continue
        thing.polygon = polygon
        painted.append((thing, x0, y0, colours))

    # Keep objects with enough visible pixels once nearer ones are drawn over them.
    owner = paint_polygons(np.full((height, width), -1, np.int32), [t.polygon for t, *_ in painted],
                           list(range(len(painted))))
    visible = np.bincount(owner[owner >= 0], minlength=len(painted))
    painted = [p for p, n in zip(painted, visible) if n >= _MIN_VISIBLE_PX]

    image = rgb
    for thing, x0, y0, colours in painted:
        mask = paint_polygons(np.zeros((height, width), np.uint8), [thing.polygon], [1]).astype(bool)
        ys, xs = np.nonzero(mask)
        if thing.camouflage:
            # What lies behind, a shade darker: no colour edge to speak of, only the depth step.
            fill = image[ys, xs] * 0.95 + 4.0 * rng.standard_normal((len(ys), 3))
        else:
            # Pixels inside the outline but outside the drawn parts (outline simplification) take the
            # object's mean colour.
            crop = colours[np.clip(ys - y0, 0, colours.shape[0] - 1), np.clip(xs - x0, 0, colours.shape[1] - 1)]
            empty = crop.sum(axis=1) == 0
            crop[empty] = crop[~empty].mean(axis=0) if (~empty).any() else 128.0
            shading = 1.0 - 0.25 * (ys - ys.min()) / max(1, ys.max() - ys.min())
            fill = crop * shading[:, None] + 7.0 * rng.standard_normal((len(ys), 3))
        image[ys, xs] = fill
        bulge = 0.0
        if _base_class(thing.parts[0][0]) in ("car", "truck", "bus") and len(thing.parts) == 1:
            # Vehicle bodies are rounded: up to 0.3 m nearer in the middle than at the ends.
            uc = thing.parts[0][1]
            half = _SIZES[thing.parts[0][0]][1] * thing.scale / 2
            bulge = 0.3 * np.clip(1 - ((xs + 0.5 - uc) / max(half, 1.0)) ** 2, 0, 1)
        depth[ys, xs] = thing.depth - bulge

    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    disparity = _disparity(rng, cam, depth, height, width)
    objects = [{"label": name, "polygon": _outline(m.astype(np.uint8), 0, 0).tolist()}
               for name, m in _stuff_order(stuff) if m.any()]
    objects += [{"label": t.label, "polygon": t.polygon.tolist()} for t, *_ in painted]
    label_ids, instance_ids = rasterise_labels(objects, height, width)
    return Scene(image, depth, disparity, objects, label_ids, instance_ids, cam)


def _stuff_order(stuff: dict[str, np.ndarray]) -> Iterable[tuple[str, np.ndarray]]:
    # Sky first as the whole frame, then regions that lie in front of it; the road last so it covers
    # the sidewalk polygon's filled-in holes.
    yield "sky", np.ones_like(stuff["sky"])
    for name in ("building", "vegetation", "sidewalk", "road"):
        for component in _components(stuff[name]):
            yield name, component


def _components(mask: np.ndarray) -> list[np.ndarray]:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [labels == k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= 4]


def _disparity(rng: np.random.Generator, cam: Camera, depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """Cityscapes disparity encoding of the true depth, with invalid (0) sky, holes and left band."""
    valid = depth > 0
    p = np.zeros((height, width), np.float64)
    p[valid] = 256.0 * cam.baseline * cam.fx / depth[valid] + 1.0
    disparity = np.clip(np.rint(p), 0, 65535).astype(np.uint16)
    holes = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        centre = (int(rng.uniform(0, width)), int(rng.uniform(height * 0.4, height)))
        axes = (int(rng.uniform(0.01, 0.05) * width) + 1, int(rng.uniform(0.01, 0.04) * height) + 1)
        cv2.ellipse(holes, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    holes[:, : max(1, int(round(0.015 * width)))] = 1
    disparity[holes.astype(bool)] = 0
    return disparity


def rasterise_labels(objects: list[dict], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """labelIds (uint8) and instanceIds (uint16) of a polygons json's objects, Cityscapes-style: later
    objects cover earlier ones; instance classes get labelId * 1000 + k (k counts per class), groups and
    stuff their label id."""
    polygons = [np.asarray(o["polygon"], np.int32) for o in objects]
    ids = [label_id(o["label"]) for o in objects]
    label_ids = paint_polygons(np.zeros((height, width), np.uint8), polygons, ids)
    per_class: dict[str, int] = {}
    values = []
    for obj, lid in zip(objects, ids):
        if obj["label"] in INSTANCE_LABEL_IDS:
            k = per_class.get(obj["label"], 0)
            per_class[obj["label"]] = k + 1
            values.append(lid * 1000 + k)
        else:
            values.append(lid)
    instance_ids = paint_polygons(np.zeros((height, width), np.uint16), polygons, values)
    return label_ids, instance_ids


# ------------------------------------------------------------------------------------------------- files

def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array[:, :, ::-1] if array.ndim == 3 else array
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(data), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise InputError(path, "could not encode PNG")
    path.write_bytes(encoded.tobytes())


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def image_name(split: str, index: int) -> tuple[str, str]:
    """(city, '<city>_<seq:06d>_<frame:06d>') of image ``index`` of ``split``."""
    cities = CITIES.get(split, (split,))
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_{FRAME:06d}"


def write_scene(out: Path, split: str, index: int, scene: Scene) -> None:
    city, base = image_name(split, index)
    height, width = scene.depth.shape
    _write_png(out / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", scene.image)
    gt = out / "gtFine" / split / city
    _write_json(gt / f"{base}_gtFine_polygons.json",
                {"imgHeight": height, "imgWidth": width, "objects": scene.objects})
    _write_png(gt / f"{base}_gtFine_labelIds.png", scene.label_ids)
    _write_png(gt / f"{base}_gtFine_instanceIds.png", scene.instance_ids)
    _write_png(out / "disparity" / split / city / f"{base}_disparity.png", scene.disparity)
    _write_json(out / "camera" / split / city / f"{base}_camera.json", scene.camera.to_json())


def toy_manifest(train: int, val: int, seed: int, size: tuple[int, int]) -> dict:
    """What ``toy.json`` says about a toy dataset generated with these arguments."""
    return {"generator": "boxmask toy", "version": GENERATOR_VERSION, "seed": seed, "train": train, "val": val,
            "size": f"{size[0]}x{size[1]}"}


def read_toy_manifest(root: str | os.PathLike) -> dict | None:
    """The ``toy.json`` of a folder; None when it has none or it is not a toy manifest."""
    try:
        data = json.loads((Path(root) / TOY_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == "boxmask toy" else None


def describe_toy(manifest: dict) -> str:
    """'seed 0, 24 train + 8 val, 256x512, generator v1' for a manifest."""
    return (f"seed {manifest.get('seed')}, {manifest.get('train')} train + {manifest.get('val')} val, "
            f"{manifest.get('size')}, generator v{manifest.get('version')}")


def generate_toy(out_dir: str | os.PathLike, train: int = 24, val: int = 8, seed: int = 0,
                 size: tuple[int, int] = (256, 512), progress: bool = False) -> Path:
    """Write ``train`` + ``val`` scenes in the Cityscapes layout under ``out_dir`` (and ``toy.json``, first,
    so that an interrupted run is recognised as the same dataset); returns its path."""
    out = Path(out_dir)
    _write_json(out / TOY_MANIFEST, toy_manifest(train, val, seed, size))
    jobs = [("train", i) for i in range(train)] + [("val", i) for i in range(val)]
    # A context manager, so that a write error closes the bar before its one-line message.
    with tqdm(jobs, desc="make-toy", unit="img", disable=not progress) as bar:
        for split, index in bar:
            write_scene(out, split, index, render_scene(seed, split, index, size))
    return out


def toy_cache_dir(cfg: ToyConfig) -> Path:
    """cfg.cache_dir, else $BOXMASK_CACHE/toy-<params>, else ~/.cache/boxmask/toy-<params>; the params
    include ``GENERATOR_VERSION``, so data of an older generator is never reused."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    height, width = parse_size(cfg.size)
    base = Path(os.environ.get("BOXMASK_CACHE") or Path.home() / ".cache" / "boxmask").expanduser()
    return base / f"toy-gen{GENERATOR_VERSION}-s{cfg.seed}-t{cfg.train}-v{cfg.val}-{height}x{width}"


def ensure_toy(cfg: ToyConfig) -> Path:
    """The toy dataset's folder, generated on first use.

    Generation goes into a temporary sibling folder that is renamed into place, so a reader never sees
    half a dataset; when two processes race, the loser discards its copy and uses the winner's.
    """
    target = toy_cache_dir(cfg)
    if (target / "leftImg8bit").is_dir():
        return target
    size = parse_size(cfg.size)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating the toy dataset (%d train + %d val at %dx%d) into %s",
             cfg.train, cfg.val, size[0], size[1], target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        generate_toy(tmp, cfg.train, cfg.val, cfg.seed, size, progress=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its copy into place first: use that one.
            if not (target / "leftImg8bit").is_dir():
                raise InputError(target, "exists but holds no toy dataset; remove it or set "
                                         "dataset.toy.cache_dir to another folder") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
