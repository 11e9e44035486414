"""Adaptive fusion (issue 25, item 6): a round's network weight from how well its student reproduces the labels it
was trained on, measured without ground truth (pipeline.calibration)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.calibration import (Calibration, calibration_samples, fit_gain, load_or_calibrate, measure_fit,
                                  weight_factor)
from pipeline.config import config_path_for, load_config
from pipeline.datasets.cityscapes import CityscapesDataset
from pipeline.datasets.toy import generate_toy
from pipeline.errors import UserError
from pipeline.shards import ShardMeta, ShardWriter, encode_rle, rows_to_table
from teacher import StructuredTeacher


class EllipseNetwork:
    """A network stand-in: every box's mask is the ellipse inscribed in it, every feature the same."""

    def __init__(self, classes):
        self.classes = list(classes)

    def __call__(self, images, boxes, classes):
        g = 28
        t = (torch.arange(g) + 0.5) / g * 2 - 1
        ellipse = ((t[:, None] ** 2 + t[None, :] ** 2) <= 1).float() * 0.98 + 0.01
        return [(ellipse.expand(len(b), g, g).clone(), torch.ones(len(b), 8, 7, 7)) for b in boxes]

    def eval(self):
        return self

    def to(self, device):
        return self


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = generate_toy(tmp_path_factory.mktemp("toy"), train=3, val=0, seed=4, size=(96, 192))
    return CityscapesDataset(root, "train")


def teacher_cfg():
    cfg = load_config(config_path_for("toy"), ["teacher.crf.iters=2", "teacher.refine.steps=2"]).teacher
    return dataclasses.replace(cfg, device="cpu")


def write_labels(out: Path, dataset, masks_of) -> None:
    meta = ShardMeta(dataset="toy", split="train", data_root=str(dataset.root),
                     classes=[{"id": c.id, "name": c.name} for c in dataset.categories], config_digest="t",
                     teacher="test", round=0)
    with ShardWriter(out, meta) as writer:
        for s in dataset:
            rows = [{"image_id": s.image_id, "file_name": s.file_name, "height": s.height, "width": s.width,
                     "instance_id": int(iid), "category_id": int(cls), "category": dataset.category_name(int(cls)),
                     "box": [float(v) for v in box], "mask_rle": encode_rle(mask), "score": 1.0, "round": 0,
                     "teacher": "test", "correspondences": []}
                    for iid, box, cls, mask in zip(s.instance_ids, s.boxes, s.classes, masks_of(s))]
            writer.add(s.image_id, rows_to_table(rows))


def network_labels(dataset, network, cfg):
    teacher = StructuredTeacher(network, dataclasses.replace(cfg, unary="network"))
    return {s.image_id: [lab.mask.astype(bool) for lab in teacher.label_batch(
        [s.load_image()], [s.boxes], [s.classes], None, [s.image_id])[0]] for s in dataset}


def filled_boxes(s):
    out = []
    for x1, y1, x2, y2 in s.boxes:
        m = np.zeros((s.height, s.width), bool)
        m[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
        out.append(m)
    return out


def test_the_gain_over_the_boxes_sets_the_weight_factor():
    assert fit_gain(0.8, 0.6) == pytest.approx(0.5) and fit_gain(0.6, 0.7) == pytest.approx(-1 / 3)
    assert fit_gain(1.0, 1.0) == 0.0
    assert [weight_factor(g, 0.3) for g in (-0.3, 0.0, 0.15, 0.3, 0.9)] == pytest.approx([0, 0, 0.5, 1, 1])
    assert weight_factor(0.01, 0.0) == 1.0 and weight_factor(0.0, 0.0) == 0.0


def test_calibration_images_spread_over_the_split(dataset):
    assert [s.image_id for s in calibration_samples(dataset, 10)] == dataset.image_ids()
    picked = calibration_samples(dataset, 2)
    assert [s.image_id for s in picked] == [dataset.image_ids()[0], dataset.image_ids()[-1]]


def test_the_fit_is_one_for_the_labels_the_network_makes_and_the_iou_for_others(dataset, tmp_path):
    cfg = teacher_cfg()
    net = EllipseNetwork([c.id for c in dataset.categories])
    own = network_labels(dataset, net, cfg)
    write_labels(tmp_path / "own", dataset, lambda s: own[s.image_id])
    fit, box_fit, count = measure_fit(net, cfg, list(dataset), tmp_path / "own", 0.0)
    assert count == sum(len(s.boxes) for s in dataset) and fit == pytest.approx(1.0)
    assert 0.5 < box_fit < 0.95
    # Labels the network does not reproduce: the fit is the mean IoU with them (brute force), box sides >= 8 only.
    write_labels(tmp_path / "boxes", dataset, filled_boxes)
    fit, box_fit, count = measure_fit(net, cfg, list(dataset), tmp_path / "boxes", 8.0)
    expected = [(own[s.image_id][k] & m).sum() / (own[s.image_id][k] | m).sum()
                for s in dataset for k, m in enumerate(filled_boxes(s))
                if min(s.boxes[k, 2] - s.boxes[k, 0], s.boxes[k, 3] - s.boxes[k, 1]) >= 8]
    assert count == len(expected) and fit == pytest.approx(float(np.mean(expected)))
    assert 0.3 < fit < 0.95 and box_fit > 0.97      # the filled boxes are (nearly) those labels


def test_a_stored_calibration_is_reused_and_a_broken_one_named(tmp_path):
    path = tmp_path / "fusion.json"
    stored = Calibration(fit=0.81, box_fit=0.71, gain=0.34, instances=40, images=8, network_weight=0.5,
                         prior_weight=0.5)
    path.write_text(json.dumps(dataclasses.asdict(stored)))
    assert load_or_calibrate(path) == stored             # no calibration runs: it would need its arguments
    path.write_text("{not json")
    with pytest.raises(UserError, match="fusion.json: unreadable calibration .*; delete it to calibrate again"):
        load_or_calibrate(path)
    fused = stored.fusion(teacher_cfg().fusion)
    assert (fused.network_weight, fused.prior_weight) == (0.5, 0.5)
