"""AsyInst asymmetric-affinity refinement of the CRF marginals on the RoI logits (DESIGN section 4, step 5).

    y* = y_0 - lr * grad, repeated ``steps`` times, on
    L(y) = lambda_proj L_proj(y, box) + lambda_c L_color_asym(y) + lambda_d L_depth_asym(y) + lambda_crf BCE(s(y), Q)

with y_0 = logit(Q_crf). The objectives are `teacher.affinity`'s (BoxInst projection, AsyInst Eq. 9-11); the
colour edge set comes from BoxInst's LAB similarity of each RoI crop and the depth edge set from AsyInst's
depth-gradient criterion (only when depth exists). The pixel terms (BCE, affinities) are scaled to "per RoI
pixel" units (times N R^2) and the projection term per row / column (times N R), so ``lr`` is a step in logit
units that does not depend on the number of RoIs or on R.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .affinity import asymmetric_affinity_loss, color_edges, depth_edges, projection_loss
from .color import image_color_similarity
from .config import ObjectiveConfig, RefineConfig

_LOGIT_CLAMP = 8.0


def roi_color_edges(rgb: torch.Tensor, valid: torch.Tensor, inside: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """BoxInst colour edge sets of RoI crops: similarity >= tau_c with the centre pixel in the box.

    rgb (N,3,R,R) float in [0, 255]; valid (N,1,R,R) bool (crop pixel inside the image); inside (N,1,R,R) bool.
    Returns (N,8,R,R) bool. Each crop is its own image for `image_color_similarity` (stride 1), so no edge ever
    joins two RoIs or reaches outside the image.
    """
    if rgb.shape[0] == 0:
        return inside.new_zeros((0, 8) + tuple(rgb.shape[2:]), dtype=torch.bool)
    crops = rgb.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    sim = image_color_similarity(crops, 1, cfg.color_theta, cfg.pairwise_size, cfg.pairwise_dilation,
                                 valid=valid[:, 0])
    return color_edges(sim, inside, cfg.color_thresh)


def roi_depth_edges(depth: torch.Tensor, inside: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """AsyInst depth-gradient edge sets of RoI depth crops (0 = invalid): depth (N,1,R,R), inside (N,1,R,R) bool
    -> (N,8,R,R) bool."""
    if depth.shape[0] == 0:
        return inside.new_zeros((0, 8) + tuple(inside.shape[2:]), dtype=torch.bool)
    return depth_edges(depth[:, 0], inside, cfg.depth_thresh, cfg.pairwise_dilation)


def refine_objective(logits: torch.Tensor, q_crf: torch.Tensor, inside: torch.Tensor, colour: torch.Tensor | None,
                     depth: torch.Tensor | None, cfg: RefineConfig, obj: ObjectiveConfig) -> torch.Tensor:
    """The refinement objective L(y) above, in per-pixel units (scalar).

    logits (N,1,R,R); q_crf (N,1,R,R) CRF fg marginals; inside (N,1,R,R) bool box mask; colour / depth (N,8,R,R)
    edge sets or None.
    """
    n, _, r, _ = logits.shape
    scale = float(n * r * r)
    loss = cfg.lambda_proj * projection_loss(logits, inside) * n * r
    loss = loss + cfg.lambda_crf * F.binary_cross_entropy_with_logits(logits, q_crf, reduction="mean") * scale
    dil = obj.pairwise_dilation
    if colour is not None and cfg.color_weight > 0 and colour.any():
        loss = loss + cfg.color_weight * obj.lambda_color * scale * asymmetric_affinity_loss(
            logits, colour, obj.delta_color, obj.gamma_color, dil)
    if depth is not None and cfg.depth_weight > 0 and depth.any():
        loss = loss + cfg.depth_weight * obj.lambda_depth * scale * asymmetric_affinity_loss(
            logits, depth, obj.delta_depth, obj.gamma_depth, dil)
    return loss


def refine(q_crf: torch.Tensor, inside: torch.Tensor, colour: torch.Tensor | None, depth: torch.Tensor | None,
           cfg: RefineConfig, obj: ObjectiveConfig) -> torch.Tensor:
    """Refined fg probabilities (N,1,R,R) from the CRF marginals q_crf (N,1,R,R) (module docstring).

    inside (N,1,R,R) bool box mask; colour / depth (N,8,R,R) edge sets or None. Outside the box the result is 0.
    """
    if cfg.steps <= 0 or q_crf.shape[0] == 0:
        return q_crf * inside
    q = q_crf.detach().clamp(1e-4, 1 - 1e-4)
    y = torch.logit(q).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            y = y.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(refine_objective(y, q, inside, colour, depth, cfg, obj), y)
            y = (y - cfg.lr * grad).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
    return torch.sigmoid(y.detach()) * inside
