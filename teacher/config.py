"""Typed configuration of the structured teacher.

Plain dataclasses only: the loader that fills them from YAML lives in ``pipeline.config`` (the one config
system); the teacher must stay importable without the pipeline. Defaults are the papers' settings unless a
field's comment says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ObjectiveConfig:
    """Box-supervised objectives (BoxInst projection + colour affinity, AsyInst depth affinity)."""

    pairwise_size: int = 3
    pairwise_dilation: int = 2
    color_theta: float = 2.0          # BoxInst: exp(-||dLAB|| / theta)
    color_thresh: float = 0.3         # tau_c
    depth_thresh: float = 0.01        # tau_d (AsyInst Eq. 3)
    delta_color: float = 2.5          # AsyInst Eq. 9-11, colour
    gamma_color: float = 1.5
    delta_depth: float = 3.5          # AsyInst, depth
    gamma_depth: float = 2.5
    lambda_color: float = 1.0
    lambda_depth: float = 0.1
    warmup_iters: int = 10000         # linear warm-up of the affinity weights


@dataclass
class BankConfig:
    """Per-class memory bank (DiscoBox appendix C.3)."""

    capacity: int = 100
    max_partners: int = 10
    min_partners: int = 5
    min_box_side: float = 32.0
    mode: str = "random"              # "random" (paper) | "official" (DiscoBox code's retrieval criteria)
    seed: int = 0


@dataclass
class CorrespondenceConfig:
    """Sinkhorn / message-passing correspondence between an object and its bank partners."""

    mode: str = "icm"                 # "icm" (paper) | "official" (DiscoBox code's message-passing solve)
    grid: int = 7                     # g: RoI feature grid
    epsilon: float = 0.05
    sinkhorn_tol: float = 1e-6
    sinkhorn_max_iter: int = 200
    icm_iters: int = 3
    geometric_weight: float = 0.5


@dataclass
class CRFConfig:
    """Mean-field CRF over RoIs (DiscoBox Eq. 4-6)."""

    mode: str = "soft"                # "soft" (paper) | "official" (hard re-threshold, 3x3 with centre)
    iters: int = 10
    tol: float = 1e-4
    w1: float = 2.0                   # colour Potts weight
    zeta: float = 0.5                 # colour kernel bandwidth (on normalised colour)
    dilation: int = 1
    cross_image_weight: float = 0.5


@dataclass
class RefineConfig:
    """AsyInst asymmetric-affinity refinement on the RoI logits after the CRF."""

    steps: int = 10
    lr: float = 0.5
    lambda_crf: float = 1.0           # weight of BCE(sigmoid(y), Q_crf)


@dataclass
class TeacherConfig:
    roi_size: int = 56                # R: teacher resolution of RoI crops
    device: str = "auto"              # "auto" | "cpu" | "cuda"
    seed: int = 0
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    correspondence: CorrespondenceConfig = field(default_factory=CorrespondenceConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
