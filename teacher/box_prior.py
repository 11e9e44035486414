"""Box-prior mode of the teacher: a mask unary from the box alone plus colour evidence, and low-level RoI features.

Unary (all maps on the padded R x R RoI crops of `teacher.roi`, u/v = box-normalised coordinates):

1. Shape prior, a soft superellipse: logit_s = (1 - (|u|^p + |v|^p)^(1/p)) / softness. p = 2 is the inscribed
   ellipse (the strongest box-only baseline on real photographs); larger p fills the corners.
2. Colour evidence: per-RoI LAB histograms (``bins``^3 cells, Laplace smoothing ``alpha``). The foreground model
   is the histogram of the in-box pixels weighted by the current posterior; the background model mixes a global
   one (the ring outside the box, plus in-box pixels weighted by 1 - posterior) with a *local* one: the ring is
   split into its four sides and every pixel takes the side histograms weighted by softmax(-distance / tau) to
   those sides, because the background next to the left edge of a box is what the left edge must be told apart
   from. logit = logit_s + w_c * clip(log p_fg(c) - log p_bg(c)), re-estimated ``em_iters`` times.

Also here: the low-level correspondence features of the box-prior mode (colour, gradient, position, depth) and
the CRF's Potts features (colour, plus relative depth when depth exists).

The hyperparameters are a handful of scalars (`BoxPriorConfig`) tuned on coco_tiny mean IoU (the depth scale on
the toy data); no ground-truth mask is used to build any part of the prior. Findings on coco_tiny (1,417
instances; bench/teacher.py --ablation): superellipse exponents 1.7-3 are within 0.01 of the ellipse (p = 2
kept); the colour model adds ~3 points, and most of that is the side-local background (a global ring histogram
alone gives ~1 point less); finer histograms (10-12 bins), more EM rounds, hole filling or keeping the largest
component change < 0.001; in-box pixels in the local background models hurt (-0.2 to -0.4 points); fading the
colour term out when the fg / bg histograms overlap (Bhattacharyya coefficient above 0.8 / 0.9) hurt too (-0.18 /
-0.04 points), so the CRF and the refinement, not a gate, handle weak colour evidence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import BoxPriorConfig
from .roi import RoIGrid


def superellipse_logits(grid: RoIGrid, exponent: float, softness: float) -> torch.Tensor:
    """Shape-prior logits (N,1,R,R) float32: (1 - (|u|^p + |v|^p)^(1/p)) / softness (0 on the superellipse)."""
    if exponent <= 0 or softness <= 0:
        raise ValueError(f"superellipse_logits: need exponent > 0 and softness > 0, got {exponent}, {softness}")
    level = (grid.u.abs()[:, None, :] ** exponent + grid.v.abs()[:, :, None] ** exponent) ** (1.0 / exponent)
    return ((1.0 - level) / softness)[:, None]


def colour_bins(lab: torch.Tensor, bins: int) -> torch.Tensor:
    """Joint LAB histogram cell of every pixel: lab (N,3,R,R) float -> (N,R*R) int64 in [0, bins^3)."""
    lo = lab.new_tensor([0.0, -128.0, -128.0]).view(1, 3, 1, 1)
    span = lab.new_tensor([100.0, 256.0, 256.0]).view(1, 3, 1, 1)
    q = ((lab - lo) / span * bins).long().clamp(0, bins - 1)
    return ((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]).flatten(1)


def weighted_histograms(cells: torch.Tensor, weights: torch.Tensor, ncells: int, alpha: float) -> torch.Tensor:
    """Normalised histograms with Laplace smoothing: cells (N,P) int64, weights (N,P) float -> (N,ncells)."""
    hist = torch.full((cells.shape[0], ncells), float(alpha), dtype=weights.dtype, device=weights.device)
    hist.scatter_add_(1, cells, weights)
    return hist / hist.sum(1, keepdim=True)


def side_weights(grid: RoIGrid, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring side of every crop pixel and the softmax weights of the four sides as seen from every pixel.

    Returns side (N,R*R) int64 in {0: left, 1: right, 2: top, 3: bottom} (the side a pixel outside the box lies
    beyond; meaningless inside) and weights (N,4,R*R) float32 = softmax(-distance_to_side / tau).
    """
    n, r = grid.u.shape
    u = grid.u[:, None, :].expand(n, r, r)
    v = grid.v[:, :, None].expand(n, r, r)
    side = torch.stack([-u - 1, u - 1, -v - 1, v - 1], 1).argmax(1).flatten(1)
    dist = torch.stack([1 + u, 1 - u, 1 + v, 1 - v], 1).clamp(min=0).flatten(2)
    return side, torch.softmax(-dist / tau, 1)


def colour_log_ratio(cells: torch.Tensor, valid: torch.Tensor, grid: RoIGrid, fg_prob: torch.Tensor,
                     cfg: BoxPriorConfig) -> torch.Tensor:
    """Clipped colour log-likelihood ratio log p_fg - log p_bg (module docstring).

    cells (N,R*R) from `colour_bins`; valid (N,1,R,R) bool (inside the image); fg_prob (N,1,R,R) current
    posterior. Returns llr (N,1,R,R) float32 in [-clip, clip].
    """
    n, _, r, _ = valid.shape
    ncells = cfg.color_bins**3
    ok = valid.flatten(1).to(torch.float32)
    inside = grid.inside.flatten(1).to(torch.float32)
    ring = (1.0 - inside) * ok
    q = fg_prob.flatten(1) * inside * ok
    fg = weighted_histograms(cells, q, ncells, cfg.color_alpha)
    bg = weighted_histograms(cells, ring * cfg.ring_weight + (inside * ok - q), ncells, cfg.color_alpha)
    p_fg = fg.gather(1, cells)
    p_bg = bg.gather(1, cells)
    if cfg.local_background > 0:
        side, weights = side_weights(grid, cfg.local_tau)
        local = torch.zeros_like(p_bg)
        for s in range(4):
            hist = weighted_histograms(cells, ring * (side == s), ncells, cfg.color_alpha)
            local = local + weights[:, s] * hist.gather(1, cells)
        p_bg = cfg.local_background * local + (1.0 - cfg.local_background) * p_bg
    llr = (p_fg.log() - p_bg.log()).clamp(-cfg.color_clip, cfg.color_clip)
    return llr.view(n, 1, r, r)


def box_prior_logits(lab: torch.Tensor, valid: torch.Tensor, grid: RoIGrid, cfg: BoxPriorConfig) -> torch.Tensor:
    """The box-prior unary as logits (N,1,R,R) float32 over the padded crops (module docstring).

    lab (N,3,R,R) LAB crops (`teacher.color.rgb_to_lab` units), valid (N,1,R,R) bool inside-the-image mask.
    Outside the box the logits are the shape prior's (negative); callers clip masks to the box anyway.
    """
    prior = superellipse_logits(grid, cfg.exponent, cfg.softness)
    if cfg.color_weight <= 0 or cfg.em_iters <= 0:
        return prior
    cells = colour_bins(lab, cfg.color_bins)
    logits = prior
    for _ in range(cfg.em_iters):
        logits = prior + cfg.color_weight * colour_log_ratio(cells, valid, grid, torch.sigmoid(logits), cfg)
    return logits


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of (N,1,R,R) maps with 3x3 Sobel filters (replicate padding) -> (N,1,R,R)."""
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    k = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    return g.square().sum(1, keepdim=True).sqrt()


def lowlevel_features(lab: torch.Tensor, grid: RoIGrid, depth: torch.Tensor | None, depth_valid: torch.Tensor | None,
                      size: int) -> torch.Tensor:
    """Correspondence features of the box-prior mode, average-pooled to a size x size grid.

    Channels (all >= 0, because the correspondence applies relu + L2 normalisation): L/100, (a+128)/256,
    (b+128)/256, the Sobel gradient magnitude of L/100, the box-normalised position (u+1)/2 and (v+1)/2, and with
    depth the depth relative to the RoI's valid median, 0.5 + clamp(d / median - 1, -0.5, 0.5) (0.5 where
    invalid, and everywhere without depth, so the memory bank sees one feature shape), which does not depend on
    how far away the object is. lab (N,3,R,R); depth / depth_valid (N,1,R,R) or None.
    Returns (N,7,size,size) float32.
    """
    n, _, r, _ = lab.shape
    colour = (lab + lab.new_tensor([0.0, 128.0, 128.0]).view(1, 3, 1, 1)) / lab.new_tensor([100.0, 256.0, 256.0]).view(
        1, 3, 1, 1)
    grad = sobel_magnitude(lab[:, :1] / 100.0)
    u = ((grid.u + 1) / 2)[:, None, None, :].expand(n, 1, r, r)
    v = ((grid.v + 1) / 2)[:, None, :, None].expand(n, 1, r, r)
    rel = torch.full_like(grad, 0.5)
    if depth is not None and depth_valid is not None:
        rel = relative_depth(depth, depth_valid).clamp(-0.5, 0.5) + 0.5
    chans = [colour, grad, u, v, rel]
    return F.adaptive_avg_pool2d(torch.cat(chans, 1), size)


def relative_depth(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Depth relative to each RoI's median valid depth, d / median - 1 (0 where invalid or no valid pixel).

    depth (N,1,R,R) metres, valid (N,1,R,R) bool -> (N,1,R,R): independent of how far away the object is.
    """
    n = depth.shape[0]
    d, ok = depth.flatten(1), valid.flatten(1)
    med = torch.stack([di[oi].median() if oi.any() else di.new_tensor(1.0) for di, oi in zip(d, ok)])
    rel = depth / med.clamp(min=1e-6).view(n, 1, 1, 1) - 1.0
    return torch.where(valid, rel, torch.zeros_like(rel))


def crf_features(lab: torch.Tensor, depth: torch.Tensor | None, depth_valid: torch.Tensor | None,
                 cfg: BoxPriorConfig) -> torch.Tensor:
    """Per-pixel features of the CRF's Potts kernel: LAB / lab_scale, plus relative depth / depth_scale.

    With depth (and depth_scale > 0) a relative depth step of depth_scale weakens the Potts smoothing as much as
    lab_scale LAB units of colour difference, so the CRF stops at depth discontinuities too.
    lab (N,3,R,R); depth / depth_valid (N,1,R,R) or None -> (N,3|4,R,R) float32.
    """
    colour = lab / cfg.lab_scale
    if depth is None or depth_valid is None or cfg.depth_scale <= 0:
        return colour
    return torch.cat([colour, relative_depth(depth, depth_valid) / cfg.depth_scale], 1)

