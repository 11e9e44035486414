"""The student network: torchvision Mask R-CNN with FPN, assembled by constructor injection.

``build_model(cfg, num_classes)`` returns a ``torchvision.models.detection.GeneralizedRCNN`` whose parts carry
torchvision's attribute names (``backbone``, ``rpn``, ``roi_heads.{box_head, box_predictor, mask_head,
mask_predictor}``), so a torchvision Mask R-CNN state dict loads into it (all but the mask predictor's upsampling).
Three parts are ours:

- ``BoxSupervisedRoIHeads``: torchvision's box branch and losses, and a mask branch trained without mask targets
  (``student.losses``);
- ``MaskPredictor``: bilinear instead of transposed-conv upsampling, optionally class-agnostic (see its docstring);
- ``PixelAlignedTransform``: torchvision's normalise / resize / batch, fixed for per-pixel targets (see its
  docstring).

The backbone is a ResNet or MobileNetV2 with an FPN (``build_backbone``). ``cfg.weights``: ``imagenet`` for
torchvision's ImageNet file of the backbone (``student.weights``), a path, or "" for random init. Normalisation:
with pretrained weights the stem and BatchNorm are frozen (the papers' detectron2 setting); from random init frozen
BatchNorm is an identity that cripples training, so BatchNorm trains (``norm: auto``).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet, resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, RPNHead, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from boxmask_common.errors import UserError
from boxmask_common.files import load_weights_only
from .config import StudentConfig

from .roi_heads import PROJECTIONS, BoxSupervisedRoIHeads
from .transform import PixelAlignedTransform
from .weights import resolve as resolve_weights

# name -> (block, layers). "small" is a ResNet-10 (one BasicBlock per stage): the toy backbone, about 3x
# cheaper than ResNet-18 per step on a CPU, and deep enough to learn the toy scenes' shapes.
BACKBONES: dict[str, tuple[type, list[int]]] = {
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
    "small": (resnet.BasicBlock, [1, 1, 1, 1]),
}


class MaskPredictor(nn.Module):
    """Mask logits at twice the RoI feature side: bilinear upsampling, a 3x3 conv, then 1x1 logits per class, or
    one class-agnostic channel broadcast to every class.

    torchvision's predictor upsamples with a stride-2 transposed conv, which gives every 2 x 2 output block its own
    weights. Box-supervised losses cannot see that freedom: a checkerboard satisfies the projection loss (every row
    and column has a 1) and the dilation-2 affinity (pairs two pixels apart agree), and from boxes alone the student
    falls into it. Bilinear upsampling has no such freedom. x (P,C,s,s) -> (P,K,2s,2s).

    ``class_agnostic``: one mask channel shared by all K classes (a view, expanded to K so that every reader, the
    losses, torchvision's inference and the teacher adapter, picks "the box class's channel" unchanged). With 80
    classes and a few masks for most of them, a per-class channel sees almost no training signal.
    """

    def __init__(self, in_channels: int, dim: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels, dim, 3, padding=1)
        self.mask_fcn_logits = nn.Conv2d(dim, 1 if class_agnostic else num_classes, 1)
        for layer in (self.conv, self.mask_fcn_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        if class_agnostic:
            # Kaiming's fan-out of a one-channel 1x1 conv is 1: logits of std ~sqrt(2) x |features| at init, which
            # diverge in the first steps (tests/test_student_train.py at lr 0.01). detectron2's predictor init
            # starts every mask at p = 0.5 instead.
            nn.init.normal_(self.mask_fcn_logits.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        logits = self.mask_fcn_logits(F.relu(self.conv(x)))
        return logits.expand(-1, self.num_classes, -1, -1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 8, channels)


def norm_layer(cfg: StudentConfig) -> Callable[[int], nn.Module]:
    """The backbone's normalisation: ``auto`` freezes BatchNorm only when pretrained weights are named."""
    kind = cfg.norm
    if kind == "auto":
        kind = "frozen_bn" if cfg.weights else "bn"
    layers = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d, "gn": _group_norm}
    if kind not in layers:
        raise UserError("student.norm", f"unknown norm {cfg.norm!r}; expected auto, bn, frozen_bn or gn")
    return layers[kind]


def _resnet_body(cfg: StudentConfig) -> tuple[nn.Module, dict[str, str], list[int]]:
    block, layers = BACKBONES[cfg.backbone]
    body = resnet.ResNet(block, layers, norm_layer=norm_layer(cfg))
    if cfg.weights:
        # detectron2's setting with pretrained weights: the stem (conv1 + its norm) is frozen too.
        for name, p in body.named_parameters():
            if name.startswith(("conv1", "bn1")):
                p.requires_grad_(False)
    stage2 = body.inplanes // 8
    return body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, [stage2 * 2 ** i for i in range(4)]


def _mobilenet_body(cfg: StudentConfig) -> tuple[nn.Module, dict[str, str], list[int]]:
    # The FPN taps each stride's last block (features 3, 6, 13, 18: strides 4-32), where torchvision's
    # mobilenet_backbone taps each stride's first block; the last block has seen the whole stage (at stride 16,
    # seven blocks instead of one) and the stride-32 tap is the 1280-channel head conv, the ImageNet features.
    # Strides 4-64 with the pool level are the ResNet-FPN's, so anchors and RoI levels carry over unchanged.
    features = mobilenet.mobilenet_v2(norm_layer=norm_layer(cfg)).features
    if cfg.weights:
        # As ResNet's stem + res2 under detectron2's FREEZE_AT=2: the stem and the stride-2/4 blocks stay frozen.
        for block in features[:4]:
            block.requires_grad_(False)
    taps = [3, 6, 13, 18]
    return features, {str(t): str(k) for k, t in enumerate(taps)}, [features[t].out_channels for t in taps]


def build_backbone(cfg: StudentConfig) -> BackboneWithFPN:
    """Body + FPN (P2-P6), torchvision's layout and parameter names (``body.*``, ``fpn.*``). The body is a ResNet
    (``BACKBONES``) or MobileNetV2 (``mobilenet_v2``, the CPU-sized pretrained student)."""
    if cfg.backbone == "mobilenet_v2":
        body, taps, channels = _mobilenet_body(cfg)
    elif cfg.backbone in BACKBONES:
        body, taps, channels = _resnet_body(cfg)
    else:
        raise UserError("student.backbone", f"unknown backbone {cfg.backbone!r}; expected "
                                            f"{', '.join([*BACKBONES, 'mobilenet_v2'])}")
    return BackboneWithFPN(body, taps, channels, cfg.fpn_channels)


def build_model(cfg: StudentConfig, num_classes: int) -> GeneralizedRCNN:
    """Mask R-CNN for ``num_classes`` foreground classes (+1 background), random init unless ``cfg.weights``.

    The mask head's output side is ``cfg.mask_size`` (its RoIAlign runs at half that, torchvision's ratio).
    """
    if num_classes < 1:
        raise UserError("classes", "the student needs at least one class")
    if cfg.mask_size < 4 or cfg.mask_size % 2:
        raise UserError("student.mask_size", f"must be an even number >= 4, got {cfg.mask_size}")
    if not cfg.min_size or min(cfg.min_size) < 1:
        raise UserError("student.min_size", f"needs at least one positive short side, got {cfg.min_size}")
    if cfg.projection not in PROJECTIONS:
        raise UserError("student.projection", f"unknown projection {cfg.projection!r}; expected "
                                              f"{', '.join(PROJECTIONS)}")
    backbone = build_backbone(cfg)
    channels = backbone.out_channels
    if len(cfg.anchor_sizes) != 5:
        raise UserError("student.anchor_sizes", f"needs one size per FPN level (5), got {cfg.anchor_sizes}")
    anchors = AnchorGenerator(tuple((int(s),) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    rpn = RegionProposalNetwork(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=cfg.rpn_proposals, testing=1000),
        nms_thresh=0.7)
    levels = ["0", "1", "2", "3"]
    box_head = TwoMLPHead(channels * 7 * 7, cfg.box_head_dim)  # torchvision v1's head: its COCO weights fit
    roi_heads = BoxSupervisedRoIHeads(
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2), box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=cfg.rois_per_image, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=cfg.score_thresh, nms_thresh=0.5,
        detections_per_img=cfg.detections_per_image,
        mask_roi_pool=MultiScaleRoIAlign(levels, cfg.mask_size // 2, 2),
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1),
        mask_predictor=MaskPredictor(channels, channels, num_classes + 1, cfg.class_agnostic_mask),
        cfg=cfg)
    transform = PixelAlignedTransform(min(cfg.min_size), cfg.max_size, test_size=cfg.test_size)
    model = GeneralizedRCNN(backbone, rpn, roi_heads, transform)
    if cfg.weights:
        load_weights(model, resolve_weights(cfg.weights, cfg.backbone), strict_backbone=cfg.weights == "imagenet")
    return model


def _backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ImageNet ResNet (``conv1.*`` .. ``fc.*``) or MobileNetV2 (``features.N.*``, ``classifier.*``) state dict
    -> the student's names (``backbone.body.*``), classifier dropped."""
    mobilenet_layout = any(k.startswith("features.") for k in state)
    features, classifier = ("features.", "classifier.") if mobilenet_layout else ("", "fc.")
    return {f"backbone.body.{k[len(features):]}": v for k, v in state.items()
            if k.startswith(features) and not k.startswith(classifier)}


def load_weights(model: nn.Module, path: str | os.PathLike, strict_backbone: bool = False) -> None:
    """Load weights with ``weights_only=True``: a torchvision Mask R-CNN (v1, ``maskrcnn_resnet50_fpn``) state dict,
    a bare ResNet or MobileNetV2 (ImageNet) state dict for the backbone, or a ``student.pt`` / ``teacher.pt`` export.
    A file that does not fit raises ``UserError`` naming the file and the first mismatched key. A classifier
    (``fc.*``, ``classifier.*``), torchvision's transposed-conv mask upsampling and the class-specific predictors of
    another class count are skipped, so COCO or ImageNet weights fit a dataset with other classes.

    ``strict_backbone``: every backbone body parameter and buffer must come from the file (ImageNet weights named
    as ``imagenet``: a partial load would silently train half a random backbone)."""
    state = load_weights_only(path, "weights")
    for key in ("model", "state_dict"):  # a training checkpoint, or a student.pt / teacher.pt export
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(path, "not a state dict (expected a mapping of parameter names to tensors)")
    own = model.state_dict()
    if not any(k in own for k in state):
        state = _backbone_state(state)
    fitted = {}
    for key, value in state.items():
        if key not in own and (key.endswith("num_batches_tracked") or key.startswith("roi_heads.mask_predictor.")):
            continue  # a counter frozen BatchNorm does not keep; torchvision's transposed-conv mask predictor
        if key not in own:
            raise UserError(path, f"key {key!r} does not exist in the {type(model).__name__} student")
        if own[key].shape != value.shape:
            if key.startswith(("roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits")):
                continue  # another dataset's class count, or a class-agnostic head: these start from scratch
            raise UserError(path, f"key {key!r} has shape {tuple(value.shape)}, the student expects "
                                  f"{tuple(own[key].shape)}")
        fitted[key] = value
    if strict_backbone:
        missing = [k for k in own if k.startswith("backbone.body.") and k not in fitted
                   and not k.endswith("num_batches_tracked")]
        if missing:
            raise UserError(path, f"not the backbone's full weights: {len(missing)} keys missing, the first "
                                  f"{missing[0]!r}")
    model.load_state_dict(fitted, strict=False)


__all__ = ["BACKBONES", "UserError", "build_backbone", "build_model", "load_weights", "norm_layer"]
