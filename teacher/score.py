"""Confidence score of a teacher mask: higher score = higher IoU with the true mask on average.

score = certainty = mean over the box pixels of |2 p - 1|, p the final RoI probabilities (after CRF and
refinement), in [0, 1]: a mask whose every box pixel was decided firmly (p near 0 or 1) scores high, a mask left
half-way (the image gave the CRF and the refinement nothing to agree on) scores low.

Calibration is measured, not assumed: bench/teacher.py prints the Spearman correlation of score and IoU and the
mean IoU per score quintile on coco_tiny. Measured (1,417 instances): Spearman 0.45, quintile mean IoUs 0.564,
0.630, 0.676, 0.712, 0.789. Candidates that did worse there: the fg/bg colour histogram overlap (0.36), certainty
times a power of (1 - overlap) (0.36-0.38), box area (-0.10).
"""
from __future__ import annotations

import torch


def mask_score(prob: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean |2p - 1| over the box pixels: prob (N,1,R,R) in [0, 1], inside (N,1,R,R) bool -> (N,) in [0, 1]."""
    w = inside.to(prob.dtype)
    return ((2 * prob - 1).abs() * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)
