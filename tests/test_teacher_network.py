"""Network-mode teacher (issue 10): the registry in the teacher layer, the student's adapter, and checkpoints through
``pipeline label`` on real Ray workers."""
from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import student  # noqa: F401  (registers maskrcnn-student)
from boxmask_common.errors import UserError
from pipeline.config import config_path_for, load_config
from pipeline.label_service import check_network_classes, label_digest, load_checkpoint
from student.checkpoint import NETWORK, export
from student.model import build_model
from student.teacher_network import StudentTeacherNetwork, build_from_export
from teacher.network import TeacherNetwork, UnknownNetwork, build_network, known_networks, register_network

REPO = Path(__file__).resolve().parents[1]
TINY = ["student.backbone=small", "student.fpn_channels=32", "student.box_head_dim=64", "student.mask_size=16",
        "student.min_size=[128]", "student.test_size=96", "dataset.toy.size=128x256", "dataset.toy.train=6",
        "dataset.toy.val=0"]
CLASSES = [{"id": 24, "name": "person"}, {"id": 26, "name": "car"}]


def tiny_export(path: Path, classes=CLASSES, seed: int = 0) -> str:
    cfg = load_config(config_path_for("toy"), TINY)
    torch.manual_seed(seed)
    return export(path, build_model(cfg.student, len(classes)).state_dict(), cfg.student, classes, 7, "toy",
                  "teacher")


# ------------------------------------------------------------------------------------------------ registry

def test_the_registry_refuses_unknown_names_with_the_known_list():
    assert NETWORK in known_networks()
    with pytest.raises(UnknownNetwork, match=rf"unknown network 'mystery-net' \(known networks: .*{NETWORK}"):
        build_network({"network": "mystery-net"})
    with pytest.raises(UnknownNetwork, match="unknown network None"):
        build_network({"state_dict": {}})
    with pytest.raises(ValueError, match="already registered"):
        register_network(NETWORK, lambda ckpt, where: None)
    import student

    register_network(NETWORK, student.build_teacher_network)  # the same builder again: a no-op


# ------------------------------------------------------------------------------------------------- adapter

class RedChannel(nn.Module):
    """Backbone stand-in: every FPN level is the normalised image at full resolution, so each RoI pools the image
    itself over the box (all levels at scale 1: one pooling level)."""

    def forward(self, x):
        return collections.OrderedDict((k, x) for k in ("0", "1", "2", "3"))


class ShapePredictor(nn.Module):
    """Mask predictor stand-in: 2x bilinear upsampling like ``MaskPredictor``; class 1's logits are the red channel
    (bright = foreground), class 2's its negation, so the class channel the adapter picks is visible."""

    def forward(self, x):
        red = F.interpolate(x[:, :1], scale_factor=2.0, mode="bilinear", align_corners=False) * 10
        return torch.cat([torch.zeros_like(red), red, -red], 1)


def known_shape_network(test_size: int) -> StudentTeacherNetwork:
    cfg = load_config(config_path_for("toy"), TINY + [f"student.test_size={test_size}", "student.mask_size=28"])
    model = build_model(cfg.student, 2)
    model.backbone, model.roi_heads.mask_head, model.roi_heads.mask_predictor = RedChannel(), nn.Identity(), \
        ShapePredictor()
    return StudentTeacherNetwork(model, [24, 26]).eval()


def ellipse_in(box, ys, xs):
    x1, y1, x2, y2 = box
    return ((xs - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((ys - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1


@pytest.mark.parametrize("test_size", [60, 240])  # down and up through the model's transform
def test_adapter_masks_line_up_with_the_boxes_through_a_resize(test_size):
    height, width = 120, 200
    boxes = np.array([[20.0, 10.0, 80.0, 100.0], [110.0, 30.0, 190.0, 70.0]], np.float32)
    ys, xs = np.mgrid[:height, :width] + 0.5
    image = np.zeros((height, width, 3), np.float32)
    for b in boxes:
        image[ellipse_in(b, ys, xs)] = 1.0
    net = known_shape_network(test_size)
    assert isinstance(net, TeacherNetwork) and net.classes == [24, 26]
    (probs, feats), = net([torch.from_numpy(image).permute(2, 0, 1)], [torch.from_numpy(boxes)],
                          [torch.tensor([24, 26])])
    size = 28
    assert probs.shape == (2, size, size) and feats.shape[0] == 2 and feats.shape[2:] == (7, 7)
    t = (np.arange(size) + 0.5) / size
    for k, b in enumerate(boxes):
        cy = b[1] + t[:, None] * (b[3] - b[1])
        cx = b[0] + t[None, :] * (b[2] - b[0])
        expected = ellipse_in(b, cy, cx)
        got = probs[k].numpy() > 0.5
        if k == 1:  # class 26 reads the negated channel
            got = ~got
        inter, union = (got & expected).sum(), (got | expected).sum()
        # roi_align's half-cell sampling offset at the resized scale costs a little; a wrong scale, a flipped
        # axis or an unscaled box costs far more.
        assert inter / union > 0.9, (test_size, k, inter / union)


def test_adapter_refuses_a_class_the_network_does_not_know():
    net = known_shape_network(96)
    with pytest.raises(ValueError, match=r"category id 99 is not one of the network's classes \[24, 26\]"):
        net([torch.zeros(3, 64, 64)], [torch.tensor([[4.0, 4.0, 40.0, 40.0]])], [torch.tensor([99])])


def test_an_export_builds_through_the_registry_and_batches_images(tmp_path):
    digest = tiny_export(tmp_path / "teacher.pt")
    ckpt = torch.load(tmp_path / "teacher.pt", weights_only=True)
    net = build_network(ckpt, "teacher.pt")
    assert isinstance(net, StudentTeacherNetwork) and net.classes == [24, 26] and not net.training
    images = [torch.rand(3, 100, 150), torch.rand(3, 80, 60)]
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 90.0], [70.0, 5.0, 140.0, 50.0]]), torch.tensor([[5.0, 5.0, 50.0, 70.0]])]
    classes = [torch.tensor([24, 26]), torch.tensor([26])]
    with torch.no_grad():
        batched = net(images, boxes, classes)
        single = [net([im], [b], [c])[0] for im, b, c in zip(images, boxes, classes)]
    for (p, f), (p1, f1) in zip(batched, single):
        assert p.shape[1:] == (16, 16) and f.shape[1:] == (32, 7, 7)
        assert ((p >= 0) & (p <= 1)).all()
        # Batching pads images to a common size; the RoIs see the same pixels, up to the padding's reach through
        # the convolutions (a random network's receptive field is wide, so the bound is loose).
        assert (p - p1).abs().mean() < 0.02, (p - p1).abs().mean()
    # The teacher id of a student export is its weights digest.
    assert load_checkpoint(tmp_path / "teacher.pt")[1] == digest


def test_a_tampered_or_mismatched_checkpoint_is_refused_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setenv("BOXMASK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "teacher.pt"
    tiny_export(path)
    data = torch.load(path, weights_only=True)
    key = next(iter(data["state_dict"]))
    data["state_dict"][key] = data["state_dict"][key] + 1
    torch.save(data, tmp_path / "tampered.pt")
    with pytest.raises(UserError, match="tampered.pt: weights do not match the recorded digest"):
        load_checkpoint(tmp_path / "tampered.pt")
    with pytest.raises(UserError, match="weights do not match"):
        build_from_export(data, "tampered.pt")
    network, _ = load_checkpoint(path)
    with pytest.raises(UserError, match=r"teacher.pt: the network predicts classes \[24, 26\]; the dataset "
                                            r"also has \[25\]"):
        check_network_classes(network, [24, 25, 26], path)
    # Through the CLI: one line, and nothing written (the toy classes are 8, the export knows 2).
    rc = main(["label", "--out", str(tmp_path / "out"), "--checkpoint", str(path),
               *[a for kv in TINY for a in ("--set", kv)]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "teacher.pt: the network predicts classes" in err[0]
    assert not (tmp_path / "out").exists()
    rc = main(["label", "--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "tampered.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "tampered.pt: weights do not match the recorded digest" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_config_digest_covers_the_unary_mode_with_a_network_only():
    cfg = load_config(config_path_for("toy"), [])
    fused = load_config(config_path_for("toy"), ["teacher.fusion.prior_weight=0.25"])
    network = load_config(config_path_for("toy"), ["teacher.unary=network"])
    batch = load_config(config_path_for("toy"), ["teacher.network_batch=1"])
    def digest(c, teacher_id, round_):
        return label_digest("d", c.teacher, teacher_id, round_)

    assert len({digest(c, "abc", 1) for c in (cfg, fused, network)}) == 3
    assert digest(batch, "abc", 1) == digest(cfg, "abc", 1)
    assert digest(network, "box-prior", 0) == digest(cfg, "box-prior", 0)
    assert len({label_digest(d, cfg.teacher, "abc", r) for d in ("d", "e") for r in (0, 1)}) == 4


# ----------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_network_mode_labels_through_the_label_service_on_ray_workers(tmp_path, monkeypatch):
    import ray

    from pipeline.cli import main
    from pipeline.datasets import build_dataset

    monkeypatch.setenv("BOXMASK_CACHE", str(tmp_path / "cache"))
    cfg = load_config(config_path_for("toy"), TINY)
    classes = [{"id": c.id, "name": c.name} for c in build_dataset(cfg.dataset).categories]
    (tmp_path / "runs").mkdir()
    digest = tiny_export(tmp_path / "runs" / "teacher.pt", classes)
    monkeypatch.chdir(tmp_path)  # a relative --checkpoint, resolved for the workers
    if ray.is_initialized():
        ray.shutdown()
    try:
        rc = main(["label", "--out", "labels", "--checkpoint", os.path.join("runs", "teacher.pt"), "--workers", "1",
                   "--round", "1", *[a for kv in TINY for a in ("--set", kv)],
                   "--set", "teacher.crf.iters=2", "--set", "teacher.refine.steps=2",
                   "--set", "teacher.bank.min_partners=2", "--set", "teacher.bank.min_box_side=8"])
    finally:
        ray.shutdown()
    assert rc == 0
    rows = pads.dataset(str(tmp_path / "labels"), format="parquet").to_table().to_pylist()
    assert rows and {r["teacher"] for r in rows} == {digest} and {r["round"] for r in rows} == {1}
    with_corr = [r for r in rows if r["correspondences"]]
    assert with_corr, "network mode wrote no correspondences"
    grid = cfg.teacher.correspondence.grid
    assert {c["grid"] for r in with_corr for c in r["correspondences"]} == {grid}
