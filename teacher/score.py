"""Confidence score of a teacher mask: higher score = higher IoU with the true mask on average.

score = certainty x agreement, both over the box pixels of the RoI:

- certainty: mean |2p - 1| of the final probabilities p (after CRF and refinement). A mask whose every box pixel
  was decided firmly scores high; one left half-way (the image gave the CRF and the refinement nothing to agree
  on) scores low.
- agreement: soft IoU, sum min(p, q) / sum max(p, q), of p with the CRF marginals q. The refinement pulls the
  CRF's answer towards the box and the colour edges; where it had to move it far, the two stages disagree about
  the object and the label is more often wrong.

Calibration is measured, not assumed: bench/teacher.py prints the Spearman correlation of score and IoU per mode on
coco_tiny and toy (figures: bench/RESULTS.md; bench/NOTEBOOK.md, "Network-mode teacher"). Candidates that did no
better on coco_tiny (Spearman, box-prior mode): certainty alone 0.43, the fg/bg colour histogram overlap 0.36, the
share of similar-colour neighbour pairs the mask cuts -0.38, fg/bg colour separation 0.30, mask-to-box coverage of
rows and columns 0.06-0.09, stability under a 5% box jitter 0.29, box area -0.10, and a least-squares blend of six
of these 0.50 (cross-validated).
"""
from __future__ import annotations

import torch


def certainty(prob: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean |2p - 1| over the box pixels: prob (N,1,R,R) in [0, 1], inside (N,1,R,R) bool -> (N,) in [0, 1]."""
    w = inside.to(prob.dtype)
    return ((2 * prob - 1).abs() * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)


def agreement(a: torch.Tensor, b: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Soft IoU sum min(a, b) / sum max(a, b) over the box pixels: a, b (N,1,R,R) in [0, 1] -> (N,) in [0, 1]
    (1 where both are empty)."""
    w = inside.to(a.dtype)
    inter = (torch.minimum(a, b) * w).flatten(1).sum(1)
    union = (torch.maximum(a, b) * w).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.ones_like(union))


def mask_score(prob: torch.Tensor, crf: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """certainty(prob) x agreement(prob, crf): prob and crf (N,1,R,R) in [0, 1], inside (N,1,R,R) bool -> (N,)."""
    return certainty(prob, inside) * agreement(prob, crf, inside)


def overlap_score(score: torch.Tensor, contested: torch.Tensor, margin: torch.Tensor, lost: torch.Tensor,
                  weight: float, lost_power: float) -> torch.Tensor:
    """The score of labels whose boxes overlap others, from what joint resolution knows (`teacher.occlusion`):

        score x (1 - weight x contested x (1 - margin)) x (1 - lost ** lost_power)

    score (N,) of each label over the pixels its written mask holds; contested, margin, lost (N,) in [0, 1] from
    `teacher.occlusion.Resolution`: the share of its own mask that another label claimed too, how clearly it won
    those pixels, and the share another instance won. The lost gate leaves a label that lost a few pixels almost
    as it was (0.3 ** 6 < 0.001) and takes a label that lost most of its mask towards 0: its mask is then mostly
    another object. lost_power 0 turns the gate off. -> (N,) in [0, 1].
    """
    out = score * (1 - weight * contested * (1 - margin))
    if lost_power > 0:
        out = out * (1 - lost.clamp(0, 1) ** lost_power)
    return out.clamp(0, 1)
