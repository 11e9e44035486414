"""Confidence score of a teacher mask: higher score = higher IoU with the true mask on average.

score = certainty * (1 - overlap) ** beta, in [0, 1], where

- certainty = mean over the box pixels of |2 p - 1| for the final RoI probabilities p: a mask whose every box
  pixel was decided firmly (p near 0 or 1) scores high; a mask that is half-way everywhere scores low;
- overlap = the Bhattacharyya coefficient of the RoI's foreground and background colour histograms (1 when the
  object looks exactly like its surroundings, so the image could not help and the mask is mostly the prior).

Calibration is measured, not assumed: bench/teacher.py prints the Spearman correlation of score and IoU and the
mean IoU per score quintile on coco_tiny (higher quintile -> higher mean IoU).
"""
from __future__ import annotations

import torch


def certainty(prob: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean |2p - 1| over the box pixels: prob (N,1,R,R), inside (N,1,R,R) bool -> (N,) in [0, 1]."""
    w = inside.to(prob.dtype)
    return ((2 * prob - 1).abs() * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)


def mask_score(prob: torch.Tensor, inside: torch.Tensor, overlap: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Calibrated confidence (N,) in [0, 1] (module docstring); overlap (N,) fg/bg colour histogram overlap."""
    return (certainty(prob, inside) * (1.0 - overlap).clamp(0.0, 1.0) ** beta).clamp(0.0, 1.0)
