"""Typed configuration of the student detector and its training.

Plain dataclasses: ``pipeline.config`` fills them from YAML (section ``student``) and rejects unknown keys.
Defaults are the Cityscapes setting of the papers (AsyInst Sec. 6.1, DiscoBox's SOLOv2 setting for the pseudo-label
weights); ``configs/toy.yaml`` shrinks them so one toy training stage takes minutes on 2 CPU cores.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from teacher.config import ObjectiveConfig

NETWORK = "maskrcnn-student"   # the name checkpoints give the student's teacher network (`teacher.network`)
# Backbones with torchvision ImageNet weights (`student.weights.IMAGENET`, which a test keeps equal to this).
IMAGENET_BACKBONES = ("resnet18", "resnet50", "mobilenet_v2")


def _student_objectives() -> ObjectiveConfig:
    # AsyInst trains with the same affinity settings the teacher refines with; only the warm-up is the student's.
    return ObjectiveConfig(warmup_iters=10000)


@dataclass
class StudentConfig:
    """The student (torchvision Mask R-CNN + FPN with a box-supervised mask head) and its Ray Train loop."""

    backbone: str = "resnet50"        # resnet50 | resnet18 | mobilenet_v2 | small (toy: a narrow 4-stage ResNet)
    # imagenet: torchvision's ImageNet weights of the backbone, from torch's hub cache (`pipeline weights`);
    # a path: a torchvision-format state dict (whole model or backbone); "" = random init.
    weights: str = ""
    norm: str = "auto"                # auto: frozen BN with weights, trainable BN from random init | bn | frozen_bn | gn
    fpn_channels: int = 256           # FPN and mask-head width
    box_head_dim: int = 1024          # box head's two FC layers
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per FPN level P2-P6
    rpn_proposals: int = 2000         # proposals kept after NMS in training (1000 at test time)
    rois_per_image: int = 512         # sampled proposals per image for the box head (25% positive)
    mask_size: int = 28               # mask head output side (56 for high-resolution data)
    class_agnostic_mask: bool = False  # one mask channel for every class (shipped configs: true)
    min_size: list[int] = field(default_factory=lambda: [800, 832, 864, 896, 928, 960, 992, 1024])
    max_size: int = 2048              # longest side after the resize
    test_size: int = 1024             # shortest side at evaluation / teacher time
    crop: list[int] = field(default_factory=lambda: [512, 1024])  # random HxW training crop ([] = no crop)
    flip: float = 0.5                 # horizontal flip probability
    iterations: int = 24000
    batch_size: int = 8               # images per step over all workers
    lr: float = 0.01                  # at lr_reference_batch images per step; scaled linearly with batch_size
    lr_reference_batch: int = 8
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000          # linear lr warm-up from warmup_factor * lr
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [18000])  # lr x gamma at each
    gamma: float = 0.1
    grad_clip: float = 0.0            # max gradient norm (0 = off)
    ema_momentum: float = 0.999
    ema_ramp: int = 2000              # iterations: the momentum is ema_momentum * (1 - exp(-t / ema_ramp))
    checkpoint_every: int = 2000      # iterations between checkpoints
    keep_checkpoints: int = 2
    log_every: int = 20
    max_failures: int = 2             # restarts of a dead worker (from the last checkpoint)
    workers: int = 1                  # Ray Train workers (DDP)
    cpus_per_worker: float = 1.0
    use_gpu: str = "auto"             # auto | true | false
    amp: bool = True                  # mixed precision on CUDA (ignored on CPU)
    loader_workers: int = 0           # DataLoader worker processes per training worker
    seed: int = 0
    alpha_con: float = 1.0            # L_con weight (pseudo masks)
    alpha_nce: float = 0.1            # L_nce weight (correspondences)
    nce_temperature: float = 0.1
    # The shards' correspondence cells lie on a grid x grid grid over the teacher's RoI, the box grown by pad times
    # its side on each side (teacher.correspondence.grid and teacher.box_prior.pad; `pipeline train` copies them).
    correspondence_grid: int = 7
    correspondence_pad: float = 0.4
    queue_size: int = 1000            # instances in the student's feature queue for L_nce
    mask_rois_per_image: int = 64     # positive proposals per image the mask losses see (bounds the step cost)
    # Each box also gives the mask losses one RoI around it, grown by a random factor in this range (and shifted by
    # up to a tenth of its size). The box-supervised losses learn shape from pixel pairs that cross the box edge
    # (the projection forces 0 outside the box, the affinity carries it inside); a RoI equal to the box has none,
    # and early in training, before the RPN proposes jittered boxes, the positives are mostly the boxes themselves.
    context_scale: list[float] = field(default_factory=lambda: [1.2, 1.8])
    # The box term of the mask loss: "dice" is BoxInst's projection Dice (the papers'); "bce" a log loss on the same
    # row/column maxima (losses.projection_bce_loss); "dice+bce" their sum. Dice alone lets the logits saturate,
    # after which the head's masks are its boxes (bench/NOTEBOOK.md, "The boxes student's masks are its boxes");
    # the log loss keeps them in range.
    projection: str = "dice"
    detections_per_image: int = 100
    score_thresh: float = 0.05
    objectives: ObjectiveConfig = field(default_factory=_student_objectives)
