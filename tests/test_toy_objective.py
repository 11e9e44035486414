"""The toy config's box-supervised mask objective ranks the true mask first on toy scenes.

Each candidate mask m becomes logits 4 (2m - 1) over a RoI 1.5x the instance's box (M = 28), and is scored with the
student's loss functions under a config's projection and affinity settings. The candidates are the true mask, the
filled box, and a thin cross (a 3-cell band through the box's middle row and column), which satisfies the projection
as well as the box does. The toy config must prefer the truth to both; the papers' setting (projection Dice with
AsyInst's asymmetric affinity) prefers the cross on the same scenes, which is why the toy config leaves it.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.commands.common import config_path_for
from pipeline.config import load_config
from pipeline.datasets.cityscapes import tight_box
from pipeline.datasets.toy import render_scene
from student.config import StudentConfig
from student.losses import color_term, depth_term, roi_box_masks, roi_depth, roi_in_image, roi_sample
from student.roi_heads import PROJECTIONS

M = 28
SCENES = 3


def _instances(scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N,4) and masks (N,H,W) of a toy scene's instances with both box sides >= 16 px."""
    boxes, masks = [], []
    for inst in np.unique(scene.instance_ids):
        if inst < 1000:  # Cityscapes encoding: ids under 1000 are classes without instances
            continue
        m = scene.instance_ids == inst
        box = tight_box(m)
        if min(box[2] - box[0], box[3] - box[1]) >= 16:
            boxes.append(box)
            masks.append(m)
    return torch.from_numpy(np.stack(boxes)), torch.from_numpy(np.stack(masks).astype(np.float32))


def _candidates(inside: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    cross = torch.zeros_like(inside)
    for j, box in enumerate(inside[:, 0]):
        rows, cols = torch.nonzero(box.any(1))[:, 0], torch.nonzero(box.any(0))[:, 0]
        r, c = int(rows.float().mean()), int(cols.float().mean())
        cross[j, 0, rows[0]:rows[-1] + 1, c - 1:c + 2] = 1
        cross[j, 0, r - 1:r + 2, cols[0]:cols[-1] + 1] = 1
    return {"truth": truth, "box": inside, "cross": cross * inside}


def _losses(cfg: StudentConfig) -> dict[str, float]:
    obj = cfg.objectives
    totals: dict[str, list[float]] = {}
    for index in range(SCENES):
        scene = render_scene(0, "train", index)
        boxes, masks = _instances(scene)
        wh, centre = boxes[:, 2:] - boxes[:, :2], (boxes[:, :2] + boxes[:, 2:]) / 2
        rois = torch.cat([centre - 0.75 * wh, centre + 0.75 * wh], 1)
        h, w = scene.depth.shape
        rgb = roi_sample(torch.from_numpy(scene.image).permute(2, 0, 1).float()[None], rois, M)
        valid = roi_in_image(rois, h, w, M)
        depth = roi_depth(torch.from_numpy(scene.depth), rois, M)
        inside = roi_box_masks(rois, boxes, M)
        truth = (roi_sample(masks[:, None], rois, M, index=torch.arange(len(rois))) > 0.5).float()
        for name, m in _candidates(inside, truth).items():
            logits = 4.0 * (2 * m - 1)
            total = (PROJECTIONS[cfg.projection](logits, inside)
                     + obj.lambda_color * color_term(logits, rgb, valid, inside, obj)
                     + obj.lambda_depth * depth_term(logits, depth, inside, obj))
            totals.setdefault(name, []).append(float(total))
    return {name: float(np.mean(v)) for name, v in totals.items()}


def test_the_toy_objective_prefers_the_true_mask_to_the_box_and_a_thin_cross():
    loss = _losses(load_config(config_path_for("toy")).student)
    assert loss["truth"] < loss["box"], loss
    assert loss["truth"] < loss["cross"], loss


def test_the_papers_asymmetric_setting_prefers_the_cross_on_toy_scenes():
    # The student's defaults are the papers' (projection Dice, AsyInst deltas and gammas); only the warm-up differs.
    papers = StudentConfig()
    assert papers.projection == "dice" and papers.objectives.delta_color > 0
    loss = _losses(papers)
    assert loss["cross"] < loss["truth"], loss
