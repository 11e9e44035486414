"""RoI geometry of the teacher: padded crops at a fixed resolution and paste-back into the image.

Convention: boxes are (x1, y1, x2, y2) in continuous pixel coordinates (pixel (r, c) covers [c, c+1) x [r, r+1)),
and a pixel belongs to a box when its centre (c + 0.5, r + 0.5) lies inside the box. Every RoI is the box grown
by ``pad`` times its width / height on each side, so the crop carries a ring of context around the object (the
background colour sample of the box prior, and the "outside the box" region of the projection loss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# A crop pixel counts as inside the image when at least this share of its bilinear samples are.
_VALID_SHARE = 0.99


@dataclass(frozen=True)
class RoIGrid:
    """Where the R x R crop pixels of N RoIs lie relative to their boxes.

    boxes (N,4): the (clipped) boxes; regions (N,4): the padded crop rectangles in image pixels;
    u (N,R) and v (N,R): the crop's column / row centres in box-normalised coordinates (-1 and 1 are the box
    edges, 0 its centre); inside (N,1,R,R) bool: crop pixels whose centre is inside the box.
    """

    boxes: torch.Tensor
    regions: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    inside: torch.Tensor

    @property
    def size(self) -> int:
        return self.u.shape[1]


def roi_grid(boxes: torch.Tensor, size: int, pad: float) -> RoIGrid:
    """Padded crop rectangles and box-normalised coordinates of their pixel centres.

    boxes (N,4) float x1,y1,x2,y2 with x2 > x1 and y2 > y1; size R; pad >= 0. Returns an `RoIGrid` (float32).
    """
    boxes = boxes.to(torch.float32)
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    regions = torch.stack([x1 - pad * w, y1 - pad * h, x2 + pad * w, y2 + pad * h], 1)
    t = (torch.arange(size, dtype=torch.float32, device=boxes.device) + 0.5) / size
    scale = 1.0 + 2.0 * pad
    u = (t * scale - pad)[None].expand(len(boxes), size) * 2.0 - 1.0
    v = u.clone()
    inside = (u.abs() <= 1.0)[:, None, :] & (v.abs() <= 1.0)[:, :, None]
    return RoIGrid(boxes, regions, u, v, inside[:, None])


def crop(maps: torch.Tensor, grid: RoIGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear R x R crops of per-pixel maps over the padded RoIs, with their inside-the-image mask.

    maps (C,H,W) float (e.g. RGB in [0, 255], depth); returns crops (N,C,R,R) float32 and valid (N,1,R,R) bool.
    Where a crop pixel leaves the image, the crop is the average of the valid samples (0 if none) and valid is
    False. ``sampling_ratio=2`` keeps the cost per RoI fixed: large boxes are sampled, not integrated.
    """
    ones = torch.ones_like(maps[:1])
    data = torch.cat([maps.to(torch.float32), ones.to(torch.float32)], 0)[None]
    rois = torch.cat([torch.zeros_like(grid.regions[:, :1]), grid.regions], 1)
    out = roi_align(data, rois, (grid.size, grid.size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    share = out[:, -1:]
    crops = out[:, :-1] / share.clamp(min=1e-6)
    return crops, share >= _VALID_SHARE


def crop_masked(values: torch.Tensor, valid: torch.Tensor, grid: RoIGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of a map that has its own validity (e.g. depth with 0 = invalid): invalid pixels never blend in.

    values (H,W) float, valid (H,W) bool -> crops (N,1,R,R) float32 (0 where invalid) and valid (N,1,R,R) bool
    (at least `_VALID_SHARE` of the samples valid).
    """
    v = valid.to(torch.float32)
    data = torch.stack([values.to(torch.float32) * v, v], 0)[None]
    rois = torch.cat([torch.zeros_like(grid.regions[:, :1]), grid.regions], 1)
    out = roi_align(data, rois, (grid.size, grid.size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    ok = out[:, 1:] >= _VALID_SHARE
    return torch.where(ok, out[:, :1] / out[:, 1:].clamp(min=1e-6), torch.zeros_like(out[:, :1])), ok


def box_pixel_span(box: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """Inclusive pixel range (r0, r1, c0, c1) of the pixels whose centres lie in ``box`` and in the image.

    Empty ranges come back with r1 < r0 or c1 < c0.
    """
    x1, y1, x2, y2 = (float(t) for t in box)
    c0, c1 = max(math.ceil(x1 - 0.5), 0), min(math.floor(x2 - 0.5), width - 1)
    r0, r1 = max(math.ceil(y1 - 0.5), 0), min(math.floor(y2 - 0.5), height - 1)
    return r0, r1, c0, c1


@dataclass
class Window:
    """One instance's pasted probabilities: prob (h,w) float over its box's pixel span r0..r1, c0..c1 (inclusive;
    empty when r1 < r0 or c1 < c0)."""

    prob: torch.Tensor
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def empty(self) -> bool:
        return self.r1 < self.r0 or self.c1 < self.c0


def paste_windows(prob: torch.Tensor, grid: RoIGrid, height: int, width: int) -> list[Window]:
    """Bilinear upsampling of each RoI probability onto the pixels of its box at full resolution.

    prob (N,R,R) float probabilities over the padded crops -> N `Window`s, each the (h,w) probabilities at the
    pixels whose centre is inside its box (and the image). Only the box's pixel span is sampled, so the cost follows
    the box area.
    """
    windows = []
    for i in range(prob.shape[0]):
        r0, r1, c0, c1 = box_pixel_span(grid.boxes[i], height, width)
        if r1 >= r0 and c1 >= c0:
            X1, Y1, X2, Y2 = (float(t) for t in grid.regions[i])
            xs = (torch.arange(c0, c1 + 1, device=prob.device, dtype=prob.dtype) + 0.5 - X1) / (X2 - X1) * 2 - 1
            ys = (torch.arange(r0, r1 + 1, device=prob.device, dtype=prob.dtype) + 0.5 - Y1) / (Y2 - Y1) * 2 - 1
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            sample = F.grid_sample(prob[i][None, None], torch.stack([gx, gy], -1)[None], mode="bilinear",
                                   padding_mode="border", align_corners=False)[0, 0]
        else:
            sample = prob.new_zeros((0, 0))
        windows.append(Window(sample, r0, r1, c0, c1))
    return windows


def threshold_windows(windows: list[Window], height: int, width: int, thresh: float = 0.5) -> list[torch.Tensor]:
    """Each instance on its own: N (H,W) bool masks, True where its pasted probability >= thresh."""
    masks = []
    for w in windows:
        mask = torch.zeros((height, width), dtype=torch.bool, device=w.prob.device)
        if not w.empty:
            mask[w.r0 : w.r1 + 1, w.c0 : w.c1 + 1] = w.prob >= thresh
        masks.append(mask)
    return masks


def paste(prob: torch.Tensor, grid: RoIGrid, height: int, width: int, thresh: float = 0.5) -> list[torch.Tensor]:
    """Full-resolution masks: bilinear upsampling of each RoI probability, threshold, clipped to its box.

    prob (N,R,R) float probabilities over the padded crops -> N (H,W) bool masks, each True only at pixels whose
    centre is inside its box (`paste_windows`, then `threshold_windows`).
    """
    return threshold_windows(paste_windows(prob, grid, height, width), height, width, thresh)
