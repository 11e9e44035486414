"""Typed configuration of the structured teacher.

Plain dataclasses only: the loader that fills them from YAML lives in ``pipeline.config`` (the one config
system); the teacher must stay importable without the pipeline. Defaults are the papers' settings unless a
field's comment says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
    """Per-class memory bank (DiscoBox section 3.6 and appendix C.3)."""

    capacity: int = 100               # FIFO slots per class
    max_partners: int = 10            # retrieved per query (official code: max_retrieval_objs = 5)
    min_partners: int = 5             # fewer available -> no partners (no cross-image term)
    min_box_side: float = 32.0        # only boxes with both sides >= this (px) are pushed
    mode: str = "random"              # "random" (paper) | "official" (DiscoBox code's retrieval criteria)
    seed: int = 0                     # random mode: seed of the sampling generator
    fg_iou_thresh: float = 0.7        # official mode: soft foreground IoU of the RoI masks must exceed this
    bg_iou_thresh: float = 0.7        # official mode: soft background IoU must exceed this
    appear_thresh: float = 0.7        # official mode: masked feature similarity must exceed this
    ratio_min: float = 0.9            # official mode: (w/h)_query / (w/h)_partner within [ratio_min, ratio_max]
    ratio_max: float = 1.2


@dataclass
class CorrespondenceConfig:
    """Dense correspondence between an object and its bank partners (DiscoBox section 3.3 and appendix B)."""

    mode: str = "icm"                 # "icm" (paper: ICM over Sinkhorn) | "official" (DiscoBox message-passing solve)
    grid: int = 7                     # g: RoI feature grid
    epsilon: float = 0.05             # icm: Sinkhorn entropic regulariser
    sinkhorn_tol: float = 1e-4        # icm: marginal error (L1, unit mass) at which Sinkhorn stops; 1e-6 gave
                                      # the same coco_tiny IoU for 25% more correspondence time
    sinkhorn_max_iter: int = 500
    icm_iters: int = 3                # icm: Assign/Update rounds
    geometric_weight: float = 0.5     # icm: C = C_u + weight * C_g / max(C_g)
    geometric_gamma: float = 1.0      # icm: gamma of exp(-|off_ik - off_jl|^2 / (2 gamma)), in grid cells^2
    num_iter: int = 10                # official: solve iterations
    num_smooth_iter: int = 1          # official: pass_message rounds per iteration
    dist_kernel: int = 9              # official: initial C keeps |dy|,|dx| <= dist_kernel // 2
    low_score: float = 0.3            # official appearance OT: masks clamped to [low_score, 1 - low_score]
    corr_exp: float = 1.0             # official appearance OT: exponent on the rescaled plan


@dataclass
class CRFConfig:
    """Mean-field CRF over RoIs (DiscoBox section 3.2-3.3, appendix A)."""

    mode: str = "soft"                # "soft" (paper) | "official" (hard re-threshold, 3x3 with centre)
    iters: int = 10                   # official: fixed iteration count; soft: cap on sweeps
    tol: float = 1e-4                 # soft: stop when no marginal moves more than this in a sweep
    w1: float = 2.0                   # soft: colour Potts weight
    zeta: float = 0.5                 # soft: colour kernel bandwidth (on normalised colour)
    dilation: int = 1                 # soft: 8-neighbourhood dilation
    cross_image_weight: float = 0.5   # soft: w2 on the cross-image [bg, fg] support
    unary_floor: float = 1e-4         # soft: probabilities are clamped to [floor, 1] before -log
    backend: str = "auto"             # kernel backend: auto (by device), reference, cpu, cuda (kernels.meanfield)
    kernel_size: int = 3              # official: window of the colour kernel (centre included)
    alpha0: float = 2.0               # official: kernel weight (config loss_ts)
    theta0: float = 0.5               # official: colour bandwidth
    theta1: float = 30.0              # official: spatial bandwidth
    base: float = 0.1                 # official: states are re-thresholded to {base, 1 - base}
    gamma: float = 0.01               # official: weight of inter_img_mask (MeanField's constructor default)


@dataclass
class RefineConfig:
    """AsyInst asymmetric-affinity refinement on the RoI logits after the CRF (DESIGN section 4, step 5).

    Plain gradient descent on the RoI logits y of L_proj(box) + lambda_c L_color_asym + lambda_d L_depth_asym
    + lambda_crf BCE(sigmoid(y), Q_crf); the affinity terms take delta, gamma, tau and the lambdas from
    `ObjectiveConfig`. steps = 0 switches the refinement off.
    """

    steps: int = 5
    lr: float = 0.5                   # step size on the logits
    lambda_crf: float = 1.0           # weight of BCE(sigmoid(y), Q_crf)
    lambda_proj: float = 1.0          # weight of the projection (box tightness) loss
    # Multipliers of ObjectiveConfig.lambda_color / lambda_depth (tuned: coco_tiny for colour, the toy data for
    # depth; a teacher refining one image can afford stronger affinities than a network in training).
    color_weight: float = 4.0
    depth_weight: float = 100.0


@dataclass
class BoxPriorConfig:
    """Box-prior mode unary (`teacher.box_prior`): superellipse shape prior plus per-RoI LAB colour models.

    Defaults tuned on coco_tiny mean IoU (bench/teacher.py); each field is a scalar knob, no learned table.
    """

    pad: float = 0.4                  # RoI = box grown by pad * side on each side; the ring is the bg sample
    exponent: float = 2.0             # superellipse exponent (2 = inscribed ellipse)
    softness: float = 0.35            # logit = (1 - level) / softness
    color_weight: float = 0.9         # weight of the colour log-likelihood ratio
    color_bins: int = 8               # LAB histogram cells per axis
    color_alpha: float = 0.5          # Laplace smoothing (pseudo-count per cell)
    color_clip: float = 4.0           # |log-likelihood ratio| cap
    ring_weight: float = 1.0          # weight of ring pixels in the global background model
    local_background: float = 0.9     # share of the side-local background model (0 = global ring only)
    local_tau: float = 0.2            # softmax temperature over distances to the four box sides
    em_iters: int = 2                 # colour-model re-estimations
    lab_scale: float = 20.0           # LAB / lab_scale is the CRF colour (so CRFConfig.zeta 0.5 = 10 LAB units)
    depth_scale: float = 0.1          # relative depth / depth_scale joins the CRF colour (0 = colour only)


@dataclass
class FusionConfig:
    """The fused unary of network mode (``TeacherConfig.unary = "fused"``): a weighted log-odds sum

        logit(unary) = network_weight * logit(p_network) + prior_weight * logit(p_box_prior)

    and, for the correspondence, features whose cell-wise cosine similarity is the same weighted mean of the two
    similarities (each feature relu + L2-normalised, scaled by sqrt(weight), concatenated). Weights (0, 1) give
    box-prior mode exactly and (1, 0) network mode; a weight of 0 skips that expert (the network is not run).

    Default 0.5 / 0.5, the geometric mean of the two experts, chosen on bench/teacher.py --fusion-sweep (mean IoU,
    pseudo-label vs ground truth): with students trained on box-prior shards, toy train 0.7369 (300 steps) and
    0.7414 (900 steps) against box-prior 0.7279; coco_tiny 0.6737 against 0.6700. The product of experts (1 / 1)
    gave 0.7326, 0.7373 and 0.6720, (0.5 / 1) 0.7352, 0.7369, 0.6720. Part of the gain is the softer unary alone:
    the box prior's logits halved, without a network, give 0.7338 on toy and 0.6726 on coco_tiny.

    With an ImageNet MobileNetV2 student (configs/coco_cpu.yaml, coco_tiny training images) 0.5 / 0.5 stays the
    best: 0.6846 against 0.6839 (1 / 1), 0.6844 (0.35 / 0.35), 0.6832 (0.25 / 0.5) and 0.6816 (1 / 0.5) with the
    round-1 student; network weight 0.5 / 0.75 / 1.0 / 1.5 gave 0.6842 / 0.6827 / 0.6813 / 0.6784 with the
    round-2 one (60 images), and prior weights 0.35 and 0.25 lost. So the adaptive weight only scales
    network_weight down. gain_full 0.3: the random-init ResNet-18 students' gains were -0.33 to -0.08 (their
    network mode 0.14 below the box prior), the pretrained ones' 0.31 to 0.61 and the toy students' 0.33 to 0.49
    (network mode at or above it, or fusion gaining); bench/NOTEBOOK.md, "coco_tiny: a pretrained student and
    adaptive fusion".
    """

    network_weight: float = 0.5
    prior_weight: float = 0.5
    # `pipeline run` scales network_weight each round by how far that round's student went from reproducing its
    # training labels as well as the filled boxes do towards reproducing them exactly (pipeline.calibration):
    # x 0 for no gain, x 1 from gain_full on. `pipeline label` uses network_weight as given.
    adaptive: bool = True
    calibration_images: int = 32      # training images the fit is measured on
    gain_full: float = 0.3


@dataclass
class JointConfig:
    """Joint resolution of overlapping boxes (`teacher.occlusion`), used when ``TeacherConfig.occlusion`` is
    "joint": a multi-label mean-field over the pixels inside two or more boxes that some label claims, whose
    unaries are the instances' refined log-odds plus the cues below (weights in logit units).

    How the weights were set (figures: bench/teacher.py --occlusion and bench/NOTEBOOK.md, "Overlapping boxes"):
    - Which cue tells whose a contested pixel is, measured on coco_tiny (60 images, pixels inside two boxes that
      at least one of the two labels claims and exactly one ground truth holds): the refined log-odds alone are
      right for 72 % of them, the colour models 68 %, the box centres 69 %, containment 64 %, the lower bottom
      edge 51 %; a logistic fit of the first four reaches 78 % (4-fold, by image), with weights in the ratio
      log-odds 0.34 : colour 1 : containment 1.4 : centre 3.5. The defaults keep that order (0.2, 1, 2, 1.5) after a grid on toy
      train without depth and coco_tiny.
    - The lower bottom edge only where depth is missing: toy train without depth 0.737 -> 0.745 with it
      (bottom_weight 0 -> 2); with depth it lowered toy (0.796 -> 0.789 at 1), and depth orders better.
    - Depth is most of the toy gain: toy train 0.728 off, 0.741 joint without the depth terms, 0.796 with them.
    - The mean-field adds about 0.005 over the unaries' arg-max on toy (0.791 -> 0.796).
    - give_won stays off: it gains 0.002 on toy and loses 0.005 on coco_tiny (60 images).
    - Scores: rescoring over the pixels a label kept raised the score's Spearman with IoU on toy (0.51 -> 0.56 at
      score_weight 0.25); score_weight 0 / 0.1 / 0.25 gave toy 0.634 / 0.642 / 0.558 and coco_tiny 0.401 /
      0.600 / 0.626, so 0.1.
    - The lost gate (score *= 1 - lost ** lost_power) and the score-only pass in "off" (issue 33; Spearman of score
      and IoU over a grid of blends, bench/NOTEBOOK.md, "The score sees overlaps"): the share of the own mask that
      another instance won ranks labels better than the contested share (-0.34 against -0.23 on coco_tiny, off). Power
      6 was the best of 1-6 on all three sets at once: coco_tiny off 0.460 -> 0.518, coco_tiny joint 0.571 -> 0.576,
      toy joint 0.642 -> 0.643; linear penalties cost toy up to 0.07. Resolved labels are gated only where they lost
      every pixel (their written mask is what others won): gated on what they lost before resolution, the toy run's
      students learnt less from occluded objects, and its labels fell 0.003 / 0.003 / 0.007 in rounds 1-3 (0.7939 /
      0.7968 / 0.7927 against 0.7965 / 0.7999 / 0.7998 at 5bef7ac). A least-squares or boosted-tree fit of every
      feature the joint pass gives plus box geometry reaches 0.53 on coco_tiny off (5-fold), so no blend of these
      features reaches 0.57 there. The score-only pass decides on a grid of at most 4,096 points (score_max_pixels):
      0.517 at 1.13x the time of "off" without it, against 0.518 at 1.24x with 65,536; reading the lost share off that
      grid instead of spreading the winners to every pixel: 0.516 at 1.06x. Finding the contested pixels on that grid
      too (no full-resolution map; large images paid for it): 0.511 at 4,096 points, 0.516 at 16,384 (0.75 / 1.06 ms
      per instance for the overlap stage on coco_tiny), 0.517 at 65,536 (2.38). The bench put 16,384 at 1.18x of plain
      off on coco_tiny and 1.23x at 1024x2048, so 4,096 ships.
    On coco_tiny joint resolution stays below off whatever the weights (best 0.644 against 0.658 on 60 images):
    a quarter of the pixels two labels both claim lie in both ground-truth masks (a table holds its cups), and a
    disjoint answer must give each to one of them. Given to the smallest true owner the labels would reach 0.789
    (the disjoint ceiling, bench/teacher.py --occlusion), but no cue measured finds that owner well enough
    (bench/NOTEBOOK.md, "Overlapping boxes"); configs/coco.yaml therefore keeps "off".
    """

    iters: int = 3                    # mean-field sweeps over the contested pixels (0 = unaries' arg-max)
    max_pixels: int = 65536           # above this many pixels in the contested rectangle, decide on a grid of every
                                      # s-th pixel (the others follow their grid point); bounds large images
                                      # (1024x2048 toy: 32,768 saves 1 ms/instance and loses 0.006 IoU)
    w1: float = 1.0                   # colour Potts weight of the multi-label mean-field
    zeta: float = 0.5                 # colour bandwidth, on LAB / BoxPriorConfig.lab_scale as in the CRF
    logit_weight: float = 0.2         # the instances' own refined log-odds
    colour_weight: float = 1.0        # which instance's colour histogram explains the pixel better
    centre_weight: float = 1.5        # box-normalised distance of the pixel from each box's centre
    colour_clip: float = 4.0          # |centred colour log-likelihood| cap
    colour_bins: int = 8              # LAB histogram cells per axis of the instances' colour models
    containment_weight: float = 2.0   # share of k's box inside j's minus the reverse: inner boxes are in front
    bottom_weight: float = 2.0        # lower bottom edge is nearer (street scenes)
    depth_order_weight: float = 2.0   # nearer foreground median depth is in front (only where depth exists)
    depth_pixel_weight: float = 4.0   # the pixel's depth fits the instance's median depth (only with depth)
    depth_rel: float = 0.1            # relative depth difference that counts as one unit of the depth terms
    give_won: bool = False            # a won pixel joins the winner even where its own mask had left it out
    rescore: bool = True              # score a label over its box minus the pixels other instances won
    score_weight: float = 0.1         # score *= 1 - score_weight * contested share * (1 - winning margin)
    lost_power: float = 6.0           # score *= 1 - lost ** lost_power, lost = the share of the written mask that
                                      # another instance won: with "off" its per-box mask's; resolved, 1 for a
                                      # label that lost every pixel and got its own mask back, else 0
    score_when_off: bool = True       # with occlusion "off", still resolve, for the score alone (masks stay per box)
    score_max_pixels: int = 4096      # grid points of that score-only resolution (its whole map is that grid)


@dataclass
class TeacherConfig:
    """The structured teacher (`teacher.StructuredTeacher`): one section per stage of DESIGN section 4."""

    roi_size: int = 48                # R: teacher resolution of the padded RoI crops
    device: str = "auto"              # "auto" | "cpu" | "cuda"
    seed: int = 0                     # seeds the memory bank's partner sampling (replaces bank.seed)
    mask_thresh: float = 0.5          # probability threshold of the pasted masks
    # Cross-image term from memory-bank partners, and the correspondences written to the shards (the student's
    # dense NCE term in later rounds). In box-prior mode the low-level features carry little semantics: on
    # coco_tiny the mean IoU is unchanged (0.6584 both ways over the first 60 images) for ~5 ms/instance more.
    # False skips the bank and the correspondence features altogether.
    use_correspondence: bool = True
    cross_image_size: int = 16        # side of the masks the cross-image unary is transferred at (then upsampled)
    # Where the unary comes from when a network is given (without one the teacher is always box-prior):
    # "network" (its mask probabilities and features), "box_prior" (the network is not run) or "fused" (both,
    # `FusionConfig`).
    unary: Literal["network", "box_prior", "fused"] = "fused"
    network_batch: int = 4            # images per network forward pass
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # Overlapping boxes: "joint" resolves each image's instances together so that every pixel belongs to at most
    # one of them (`JointConfig`); "off" labels each box on its own, as before (masks may overlap).
    occlusion: Literal["joint", "off"] = "joint"
    joint: JointConfig = field(default_factory=JointConfig)
    box_prior: BoxPriorConfig = field(default_factory=BoxPriorConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    correspondence: CorrespondenceConfig = field(default_factory=CorrespondenceConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
