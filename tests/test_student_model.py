"""The student model, its weights files, EMA and exports (issue 9, items 1 and 5)."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn
from torchvision.models import resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from boxmask_common.errors import UserError
from student.checkpoint import export, load_export, load_model, weights_digest
from student.config import StudentConfig
from student.ema import ModelEMA, ema_momentum
from student.model import build_model
from student.schedule import effective_lr, lr_factor


def cfg(**kw) -> StudentConfig:
    return StudentConfig(backbone="small", fpn_channels=32, box_head_dim=64, rpn_proposals=100, rois_per_image=32,
                         mask_rois_per_image=8, **kw)


def test_random_init_trains_batchnorm_and_pretrained_freezes_stem_and_bn(tmp_path):
    model = build_model(cfg(), 3)
    bns = [m for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(p.requires_grad for m in bns for p in m.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    weights = tmp_path / "r10.pth"
    torch.save(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1]).state_dict(), weights)
    frozen = build_model(cfg(weights=str(weights)), 3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.backbone.body.modules())
    assert not frozen.backbone.body.conv1.weight.requires_grad
    assert frozen.backbone.body.layer1[0].conv1.weight.requires_grad
    # The backbone-only file was loaded (stem equal), the rest stays random.
    src = torch.load(weights, weights_only=True)
    assert torch.equal(frozen.backbone.body.conv1.weight, src["conv1.weight"])


def test_whole_model_weights_round_trip_and_other_class_counts_fit(tmp_path):
    model = build_model(cfg(), 3)
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    again = build_model(cfg(weights=str(path), norm="bn"), 3)
    assert weights_digest(again.state_dict()) == weights_digest(model.state_dict())
    other = build_model(cfg(weights=str(path), norm="bn"), 5)      # class-specific predictors start fresh
    assert torch.equal(other.backbone.fpn.layer_blocks[0][0].weight, model.backbone.fpn.layer_blocks[0][0].weight)


def test_a_weights_file_that_does_not_fit_names_the_file_and_the_key(tmp_path):
    state = build_model(cfg(), 3).state_dict()
    state["backbone.fpn.extra_thing"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(UserError) as exc:
        build_model(cfg(weights=str(bad)), 3)
    assert str(bad) in str(exc.value) and "backbone.fpn.extra_thing" in str(exc.value)
    assert "\n" not in str(exc.value)
    shape = build_model(cfg(), 3).state_dict()
    shape["backbone.fpn.layer_blocks.0.0.weight"] = torch.zeros(1, 2, 3, 3)
    torch.save(shape, bad)
    with pytest.raises(UserError, match="layer_blocks.0.0.weight"):
        build_model(cfg(weights=str(bad)), 3)
    with pytest.raises(UserError, match="not found"):
        build_model(cfg(weights=str(tmp_path / "missing.pth")), 3)


@pytest.mark.parametrize("size", [28, 56])
def test_mask_head_resolution_is_configurable(size):
    model = build_model(cfg(mask_size=size), 2).eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 64, 64))
        x = model.roi_heads.mask_roi_pool(feats, [torch.tensor([[0.0, 0.0, 32.0, 32.0]])], [(64, 64)])
        logits = model.roi_heads.mask_predictor(model.roi_heads.mask_head(x))
    assert logits.shape == (1, 3, size, size)


def test_eval_mode_returns_full_resolution_masks():
    model = build_model(cfg(test_size=64, score_thresh=0.0), 2).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 48, 80)])[0]
    assert out["masks"].shape[1:] == (1, 48, 80)


def test_ema_ramp_and_average():
    assert ema_momentum(1, 0.999, 0) == 0.999
    assert ema_momentum(1, 0.999, 50) == pytest.approx(0.999 * (1 - math.exp(-1 / 50)))
    assert ema_momentum(10_000, 0.999, 50) == pytest.approx(0.999)
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(net, momentum=0.5, ramp=0)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 3
    ema.update(net)
    assert torch.allclose(ema.module[0].weight, start + 0.5)
    assert int(ema.module[1].num_batches_tracked) == 3
    # The ramp makes a short run export mostly trained weights, not the init.
    ramped = ModelEMA(net, momentum=0.999, ramp=50)
    for _ in range(300):
        ramped.update(net)
    init_share = math.prod(ema_momentum(t, 0.999, 50) for t in range(1, 301))
    assert init_share < 0.01 < 0.999 ** 300


def test_lr_schedule_warms_up_scales_and_decays():
    c = StudentConfig(lr=0.01, batch_size=16, lr_reference_batch=8, warmup_iters=100, warmup_factor=0.001,
                      steps=[1000, 2000], gamma=0.1)
    assert effective_lr(c) == pytest.approx(0.02)
    assert lr_factor(0, c) == pytest.approx(0.001)
    assert lr_factor(50, c) == pytest.approx(0.5 * 0.001 + 0.5)
    assert lr_factor(100, c) == 1.0 and lr_factor(1000, c) == pytest.approx(0.1)
    assert lr_factor(2500, c) == pytest.approx(0.01)


def test_export_loads_with_weights_only_and_rebuilds_the_model(tmp_path):
    c = cfg()
    model = build_model(c, 2)
    path = tmp_path / "teacher.pt"
    digest = export(path, model.state_dict(), c, [{"id": 24, "name": "person"}, {"id": 26, "name": "car"}], 7,
                    "toy", "teacher")
    raw = torch.load(path, weights_only=True)
    assert raw["digest"] == digest and raw["iteration"] == 7 and raw["classes"][1]["name"] == "car"
    assert raw["network"] and raw["kind"] == "teacher" and raw["config"]["backbone"] == "small"
    rebuilt, meta = load_model(path)
    assert weights_digest(rebuilt.state_dict()) == digest and not rebuilt.training


class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_tampered_export_is_refused(tmp_path):
    c = cfg()
    path = tmp_path / "teacher.pt"
    export(path, build_model(c, 2).state_dict(), c, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], 1, "toy",
           "teacher")
    data = torch.load(path, weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({**data, "extra": Payload()}, evil)
    with pytest.raises(UserError) as exc:
        load_export(evil)
    assert str(evil) in str(exc.value) and "refused" in str(exc.value) and "\n" not in str(exc.value)
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(UserError, match="refused"):
        load_export(tmp_path / "pickled.pt")
    data["state_dict"]["backbone.fpn.layer_blocks.0.0.weight"] += 1.0
    altered = tmp_path / "altered.pt"
    torch.save(data, altered)
    with pytest.raises(UserError, match="digest"):
        load_export(altered)


def test_torchvision_maskrcnn_v1_weights_fit_the_resnet50_student(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "maskrcnn_v1.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(StudentConfig(backbone="resnet50", weights=str(path)), 8)
    ref = reference.state_dict()
    own = model.state_dict()
    for key in ("backbone.body.layer3.2.conv2.weight", "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc7.weight",
                "roi_heads.mask_head.3.0.weight"):
        assert torch.equal(own[key], ref[key]), key
    assert not model.backbone.body.conv1.weight.requires_grad


def test_a_student_export_seeds_the_next_model(tmp_path):
    c = cfg()
    first = build_model(c, 2)
    path = tmp_path / "teacher.pt"
    export(path, first.state_dict(), c, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], 3, "toy", "teacher")
    again = build_model(cfg(weights=str(path), norm="bn"), 2)
    assert weights_digest(again.state_dict()) == weights_digest(first.state_dict())
