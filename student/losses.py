"""Mask losses of the student without ground-truth masks: pure functions over RoI tensors.

The objectives themselves are the teacher's golden-checked ones (``teacher.affinity``, ``teacher.refine``); this
module only expresses the student's RoIs in their terms:

- ``roi_box_masks``: the matched box in each positive proposal's M x M frame (the projection loss's target);
- ``roi_sample`` / ``roi_depth``: per-pixel maps (colour, pseudo masks, depth) RoI-aligned over the proposals;
- ``projection_bce_loss``: BCE on the RoI's row and column logit maxima, a box term whose gradient survives
  saturated logits (the projection Dice itself is the teacher's, as is);
- ``color_term``, ``depth_term``: AsyInst asymmetric affinities;
- ``consistency_loss``: L_con, BCE + Dice against the pseudo masks, weighted by the shard's score;
- ``dense_nce_loss``: DiscoBox's dense contrastive loss over the shard's correspondences.

RoI geometry: an RoI (x1, y1, x2, y2) is split into M x M cells; cell (i, j) has its centre at
(x1 + (j + 0.5) w / M, y1 + (i + 0.5) h / M) and samples the maps there (``roi_align`` with ``aligned=True``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from teacher.affinity import asymmetric_affinity_loss, check_logits, dice_loss
from teacher.config import ObjectiveConfig
from teacher.refine import roi_color_edges, roi_depth_edges

# A cell counts as having depth when at least this share of its bilinear samples do (the teacher's rule).
_VALID_SHARE = 0.99


def cell_centres(rois: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image coordinates of the M x M cell centres: rois (P,4) -> xs (P,M), ys (P,M)."""
    t = (torch.arange(size, dtype=rois.dtype, device=rois.device) + 0.5) / size
    x1, y1, x2, y2 = rois.unbind(1)
    return x1[:, None] + t * (x2 - x1)[:, None], y1[:, None] + t * (y2 - y1)[:, None]


def roi_box_masks(rois: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Box masks in RoI frames: cell (i, j) of RoI p is 1 when its centre lies inside ``boxes[p]``.

    rois (P,4), boxes (P,4) x1,y1,x2,y2 image pixels -> (P,1,M,M) float.
    """
    xs, ys = cell_centres(rois, size)
    in_x = (xs >= boxes[:, 0:1]) & (xs < boxes[:, 2:3])
    in_y = (ys >= boxes[:, 1:2]) & (ys < boxes[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None].to(rois.dtype)


def roi_in_image(rois: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """(P,1,M,M) bool: cells whose centre lies inside the (height, width) image."""
    xs, ys = cell_centres(rois, size)
    in_x = (xs >= 0) & (xs < width)
    in_y = (ys >= 0) & (ys < height)
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def roi_sample(maps: torch.Tensor, rois: torch.Tensor, size: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear M x M samples of maps over RoIs.

    maps (B,C,H,W); rois (P,4) image pixels; index (P,) int64: which of the B maps each RoI samples (default 0).
    Returns (P,C,M,M) in maps' dtype.
    """
    if index is None:
        index = torch.zeros(len(rois), dtype=rois.dtype, device=rois.device)
    boxes = torch.cat([index.to(rois.dtype)[:, None], rois], 1)
    return roi_align(maps, boxes.to(maps.dtype), (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def roi_depth(depth: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """Depth (H,W) metres, 0 = invalid, over RoIs: (P,1,M,M), 0 where fewer than 99% of a cell's samples are valid
    (invalid depth never blends into a fake value)."""
    valid = (depth > 0) & torch.isfinite(depth)
    planes = torch.stack([torch.where(valid, depth, torch.zeros_like(depth)), valid.to(depth.dtype)])[None]
    num, den = roi_sample(planes, rois, size).unbind(1)
    ok = den >= _VALID_SHARE
    return torch.where(ok, num / den.clamp(min=1e-6), torch.zeros_like(num))[:, None]


def projection_bce_loss(mask_logits: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
    """BCE of the row and column maxima of the logits against the box's projections (DiscoBox's MIL view of the
    box, with a log loss where BoxInst uses Dice).

    The projection Dice acts on sigmoid(max logit): once a row's maximum saturates its gradient vanishes, and a
    mask head trained from boxes with an affinity term drifts to logits of +50 everywhere, so its mask is the whole
    RoI. The log loss keeps a gradient of sigmoid(x) - t on every projected maximum, however saturated.

    mask_logits (P,1,M,M); box_masks (P,1,M,M) bool / 0-1. Returns the mean BCE over the RoIs' M column maxima plus
    that over their M row maxima, a sum over the two axes like the projection Dice's (0 for P = 0).
    """
    check_logits(mask_logits, "projection_bce_loss", box_masks)
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    target = box_masks.to(mask_logits.dtype)
    return sum(F.binary_cross_entropy_with_logits(mask_logits.amax(axis), target.amax(axis)) for axis in (2, 3))


def color_term(mask_logits: torch.Tensor, rgb: torch.Tensor, valid: torch.Tensor, box_masks: torch.Tensor,
               cfg: ObjectiveConfig) -> torch.Tensor:
    """AsyInst asymmetric colour affinity over the RoIs' LAB similarity edges.

    mask_logits (P,1,M,M); rgb (P,3,M,M) in [0,255] RoI-aligned over the proposals; valid (P,1,M,M) bool cells in
    the image; box_masks (P,1,M,M). Scalar.
    """
    edges = roi_color_edges(rgb, valid, box_masks.bool(), cfg)
    return asymmetric_affinity_loss(mask_logits, edges, cfg.delta_color, cfg.gamma_color, cfg.pairwise_dilation)


def depth_term(mask_logits: torch.Tensor, depth: torch.Tensor, box_masks: torch.Tensor,
               cfg: ObjectiveConfig) -> torch.Tensor:
    """AsyInst asymmetric depth-gradient affinity: mask_logits (P,1,M,M), depth (P,1,M,M) metres (0 = invalid),
    box_masks (P,1,M,M). Scalar (0 when no edge qualifies)."""
    edges = roi_depth_edges(depth, box_masks.bool(), cfg).to(mask_logits.device)
    return asymmetric_affinity_loss(mask_logits, edges, cfg.delta_depth, cfg.gamma_depth, cfg.pairwise_dilation)


def consistency_loss(mask_logits: torch.Tensor, pseudo: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L_con: per RoI, mean BCE + DiscoBox Dice of sigmoid(logits) against the pseudo mask, times the row's score,
    averaged over RoIs.

    mask_logits (P,1,M,M); pseudo (P,1,M,M) in [0,1]; weight (P,) scores in [0,1]. Scalar (0 for P = 0).
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    target = pseudo.to(mask_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(mask_logits, target, reduction="none").flatten(1).mean(1)
    dice = dice_loss(mask_logits.sigmoid(), target)
    return ((bce + dice) * weight.to(mask_logits.dtype)).mean()


def dense_nce_loss(query: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, weight: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """DiscoBox's dense contrastive loss over K matches.

    query (K,C): the feature of each match's source cell; keys (K,G,C): all G cells of the partner (unit vectors);
    positive (K,) int64: the matched partner cell; weight (K,): match confidences. For each match the positive is
    the matched cell and the negatives are the partner's other cells:
    loss = sum_k w_k CE(q_k . keys_k / T, positive_k) / sum_k w_k. Scalar (0 for K = 0 or zero total weight).
    """
    if query.shape[0] == 0:
        return query.sum() * 0.0
    logits = torch.einsum("kc,kgc->kg", query, keys.to(query.dtype)) / temperature
    ce = F.cross_entropy(logits, positive, reduction="none")
    w = weight.to(query.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1e-6)
