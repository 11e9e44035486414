"""The structured teacher end to end (DESIGN section 4): boxes in, instance masks with scores out.

Per image, all boxes batched as RoIs:

1. RoI crops of the image (and depth) at R x R over the box grown by ``box_prior.pad`` (`teacher.roi`).
2. Unary m and features f: box-prior mode -> `teacher.box_prior` (superellipse prior + LAB colour models;
   low-level features: colour, gradient, position, depth); network mode -> the network.
3. Memory bank partners of the same class (`teacher.memory_bank`) and dense correspondence with them
   (`teacher.correspondence`), giving the cross-image unary through T.
4. Mean-field CRF with colour (and relative depth) Potts and the cross-image unary (`teacher.crf.meanfield_soft`).
5. AsyInst asymmetric-affinity refinement (`teacher.refine`).
6. Paste back at full resolution inside the box, score (`teacher.score`), push into the bank.
7. Overlaps (``TeacherConfig.occlusion = "joint"``): the image's instances are resolved together, so each pixel
   belongs to at most one of them (`teacher.occlusion`); contested labels score lower.

Network mode: the network follows `teacher.network.TeacherNetwork` (one call per ``network_batch`` images, all
boxes of an image at once). ``TeacherConfig.unary`` picks how its output is used: "network" (its mask
probabilities and features), "fused" (a weighted log-odds sum with the box prior, `FusionConfig`) or "box_prior"
(the network is not run).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .box_prior import box_prior_logits, crf_features, lowlevel_features
from .color import rgb_to_lab
from .config import TeacherConfig
from .correspondence import correspond, cross_image_unary, relu_and_l2_norm_feat
from .crf import meanfield_soft
from .memory_bank import MemoryBank
from .occlusion import instance_models, own_pixels, owned_by_others, resolve
from .refine import refine, roi_color_edges, roi_depth_edges
from .roi import RoIGrid, box_pixel_span, crop, crop_masked, paste_windows, roi_grid, threshold_windows
from .score import mask_score, overlap_score

MIN_BOX_SIDE = 2.0  # px: smaller (clipped) boxes get the box-as-mask label with score 0
STAGES = ("network", "roi", "unary", "correspondence", "crf", "refine", "paste", "occlusion")
UNARY_MODES = ("network", "box_prior", "fused")
_PROB_FLOOR = 1e-4  # network probabilities are clamped to [floor, 1 - floor] before their log-odds are taken


@dataclass
class Match:
    """Sparse correspondence of one labelled object with one memory-bank partner.

    grid: g, the side of the RoI feature grid; src (M,) int64 query cells and dst (M,) int64 partner cells
    (row-major indices in [0, g*g)); weight (M,) float32 share of the query cell's transport mass on dst.
    Only the query's foreground cells are kept.
    """

    partner_image_id: str
    partner_instance_id: int
    grid: int
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray


@dataclass
class InstanceLabel:
    """Teacher label of one box: mask (H,W) bool, True only inside the box; score in [0, 1]; partner matches."""

    mask: np.ndarray
    score: float
    correspondences: list[Match] = field(default_factory=list)


def resample_box_grid(probs: torch.Tensor, grid: RoIGrid) -> torch.Tensor:
    """Values on a G x G grid spanning each box, bilinearly resampled onto the padded R x R crops.

    probs (N,G,G) -> (N,1,R,R); outside the box the border value is repeated (callers mask by ``grid.inside``),
    so the box's edge cells are not blended with zeros.
    """
    n, r = probs.shape[0], grid.size
    gx = grid.u[:, None, :].expand(n, r, r)
    gy = grid.v[:, :, None].expand(n, r, r)
    return F.grid_sample(probs[:, None], torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                         align_corners=False)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"TeacherConfig.device: expected 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            return np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad argument
            raise ValueError(f"label: {name} is not array-like ({exc})") from None
    return x


def validate_inputs(image: Any, boxes: Any, classes: Any, depth: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                np.ndarray | None]:
    """Check and normalise the arguments of `StructuredTeacher.label`; one-line ValueErrors name the argument.

    Returns image (H,W,3) uint8, boxes (N,4) float32, classes (N,) int64, depth (H,W) float32 or None.
    """
    image = _as_array(image, "image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"label: image must be (H,W,3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"label: image must be uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"label: image is empty, shape {image.shape}")
    boxes = _as_array(boxes, "boxes")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"label: boxes must be (N,4) x1,y1,x2,y2, got shape {boxes.shape}")
    if not np.issubdtype(boxes.dtype, np.number) or np.issubdtype(boxes.dtype, np.complexfloating):
        raise ValueError(f"label: boxes must be real numbers, got {boxes.dtype}")
    boxes = boxes.astype(np.float32)
    if not np.isfinite(boxes).all():
        raise ValueError("label: boxes contain NaN or inf")
    bad = np.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0]
    if len(bad):
        raise ValueError(f"label: box {int(bad[0])} {boxes[bad[0]].tolist()} is not x1,y1,x2,y2 with x2 >= x1, y2 >= y1")
    classes = _as_array(classes, "classes")
    if classes.size == 0:
        classes = classes.reshape(0)
    if classes.ndim != 1 or len(classes) != len(boxes):
        raise ValueError(f"label: classes must be (N,) with N = {len(boxes)} boxes, got shape {classes.shape}")
    if len(classes) and not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"label: classes must be integers, got {classes.dtype}")
    classes = classes.astype(np.int64)
    if depth is not None:
        depth = _as_array(depth, "depth")
        if depth.shape != image.shape[:2]:
            raise ValueError(f"label: depth must be (H,W) = {image.shape[:2]}, got shape {depth.shape}")
        if not np.issubdtype(depth.dtype, np.floating):
            raise ValueError(f"label: depth must be float metres, got {depth.dtype}")
        if np.isnan(depth).any():
            raise ValueError("label: depth contains NaN (use 0 for invalid pixels)")
        depth = np.ascontiguousarray(depth, dtype=np.float32)
    # Views such as image[:, :, ::-1] have negative strides, which torch.from_numpy refuses.
    return np.ascontiguousarray(image), boxes, classes, depth


@dataclass
class _Image:
    """One validated image of a label call: its arrays, the clipped boxes and which of them run the pipeline."""

    image: np.ndarray
    boxes: np.ndarray          # (N,4) clipped to the image
    classes: np.ndarray
    depth: np.ndarray | None
    image_id: str
    run: np.ndarray            # indices of the boxes with both sides >= MIN_BOX_SIDE


class StructuredTeacher:
    """Box-supervised mask teacher with a memory bank that persists across `label` calls (module docstring).

    ``StructuredTeacher.box_prior(config)`` builds the network-free teacher; ``StructuredTeacher(network, config)``
    the network mode (``network`` a `teacher.network.TeacherNetwork`; it is put in eval mode). ``timings``
    accumulates seconds per stage (`STAGES`) and ``labelled`` the instances run through the pipeline, for
    benchmarks.
    """

    def __init__(self, network: Callable | None, config: TeacherConfig | None = None):
        self.config = config or TeacherConfig()
        if self.config.roi_size < 8:
            raise ValueError(f"TeacherConfig.roi_size must be >= 8, got {self.config.roi_size}")
        if self.config.unary not in UNARY_MODES:
            raise ValueError(f"TeacherConfig.unary: expected one of {', '.join(UNARY_MODES)}, got {self.config.unary!r}")
        if self.config.occlusion not in ("joint", "off"):
            raise ValueError(f"TeacherConfig.occlusion: expected 'joint' or 'off', got {self.config.occlusion!r}")
        if self.config.network_batch < 1:
            raise ValueError(f"TeacherConfig.network_batch must be >= 1, got {self.config.network_batch}")
        weights = (self.config.fusion.network_weight, self.config.fusion.prior_weight)
        if min(weights) < 0 or max(weights) <= 0:
            raise ValueError(f"TeacherConfig.fusion: weights must be >= 0 and not both 0, got {weights}")
        if self.config.joint.lost_power < 0:
            raise ValueError(f"TeacherConfig.joint.lost_power must be >= 0, got {self.config.joint.lost_power}")
        # The resolution that only scores ("off") decides on a coarser grid (`JointConfig.score_max_pixels`).
        self._score_joint = dataclasses.replace(self.config.joint, max_pixels=self.config.joint.score_max_pixels)
        self.device = _resolve_device(self.config.device)
        if network is not None and hasattr(network, "eval"):
            network.eval()
        self.network = network
        # The teacher's one seed drives the bank's partner sampling (the only random choice of the pipeline).
        self.bank = MemoryBank(dataclasses.replace(self.config.bank, seed=self.config.seed))
        self.timings = dict.fromkeys(STAGES, 0.0)
        self.labelled = 0
        self._auto_image = 0

    @property
    def uses_correspondence(self) -> bool:
        """Whether the memory bank and the cross-image term run (``TeacherConfig.use_correspondence``)."""
        return bool(self.config.use_correspondence)

    @property
    def unary_mode(self) -> str:
        """The unary actually used: "box_prior" without a network, else ``TeacherConfig.unary``."""
        return "box_prior" if self.network is None else self.config.unary

    @property
    def unary_weights(self) -> tuple[float, float]:
        """(network weight, box-prior weight) of the unary's log-odds: (0, 1) in box-prior mode, (1, 0) in network
        mode, ``TeacherConfig.fusion``'s when fused."""
        mode = self.unary_mode
        if mode == "fused":
            return self.config.fusion.network_weight, self.config.fusion.prior_weight
        return (1.0, 0.0) if mode == "network" else (0.0, 1.0)

    @classmethod
    def box_prior(cls, config: TeacherConfig | None = None) -> "StructuredTeacher":
        """The network-free teacher: unary from the box and the image colours, low-level correspondence features."""
        return cls(None, config)

    def label_batch(self, images, boxes, classes, depths=None, image_ids=None,
                    return_exceptions: bool = False) -> list[list[InstanceLabel] | Exception]:
        """`label` over several images in order (the bank sees them one after the other); the network runs on
        ``network_batch`` images per call.

        With ``return_exceptions`` an image that fails (bad input, or a network call that fails for its chunk)
        gets the exception in its place instead of stopping the others, like ``asyncio.gather``.
        """
        n = len(images)
        depths = [None] * n if depths is None else depths
        image_ids = [None] * n if image_ids is None else image_ids
        if not (len(boxes) == len(classes) == len(depths) == len(image_ids) == n):
            raise ValueError("label_batch: images, boxes, classes, depths and image_ids must have the same length")

        def attempt(fn, *args):
            if not return_exceptions:
                return fn(*args)
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - handed back in the image's place
                return exc

        prepared = [attempt(self._prepare, *args) for args in zip(images, boxes, classes, depths, image_ids)]
        out: list = []
        step = self.config.network_batch
        for start in range(0, n, step):
            chunk = prepared[start:start + step]
            network_out = attempt(self._run_network, chunk)
            if isinstance(network_out, Exception):
                out.extend(p if isinstance(p, Exception) else network_out for p in chunk)
                continue
            out.extend(p if isinstance(p, Exception) else attempt(self._label_image, p, o)
                       for p, o in zip(chunk, network_out))
        return out

    def label(self, image, boxes, classes, depth=None, image_id=None) -> list[InstanceLabel]:
        """Masks for the boxes of one image.

        image (H,W,3) uint8 RGB; boxes (N,4) float x1,y1,x2,y2 pixels (clipped to the image); classes (N,) int;
        depth (H,W) float32 metres with 0 = invalid, or None; image_id names the image in the bank (partners never
        come from the same image; default: a fresh id per call). Returns N `InstanceLabel`s in box order.
        """
        return self.label_batch([image], [boxes], [classes], [depth], [image_id])[0]

    def _prepare(self, image, boxes, classes, depth, image_id) -> _Image:
        image, boxes_np, classes_np, depth_np = validate_inputs(image, boxes, classes, depth)
        height, width = image.shape[:2]
        if image_id is None:
            image_id = f"__image{self._auto_image}"
            self._auto_image += 1
        clipped = boxes_np.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
        sides = np.minimum(clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1])
        return _Image(image, clipped, classes_np, depth_np, str(image_id), np.nonzero(sides >= MIN_BOX_SIDE)[0])

    def _label_image(self, p: _Image, network_out: tuple[torch.Tensor, torch.Tensor] | None) -> list[InstanceLabel]:
        height, width = p.image.shape[:2]
        labels: list[InstanceLabel | None] = [None] * len(p.boxes)
        for i in np.setdiff1d(np.arange(len(p.boxes)), p.run):
            labels[i] = InstanceLabel(self._box_mask(p.boxes[i], height, width), 0.0, [])
        if len(p.run):
            rois = self._label_rois(p.image, p.boxes[p.run], p.classes[p.run], p.depth, p.image_id, p.run,
                                    network_out)
            for i, lab in zip(p.run, rois):
                labels[i] = lab
            if self.config.occlusion == "joint" and len(p.run) < len(p.boxes):
                # Boxes too small to run keep the box as their mask, minus what the labelled instances own.
                owned = np.logical_or.reduce([labels[i].mask for i in p.run])
                for i in np.setdiff1d(np.arange(len(p.boxes)), p.run):
                    labels[i].mask &= ~owned
        return labels

    @torch.no_grad()
    def _run_network(self, chunk: list[_Image | Exception]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The network's (mask_probs (N,G,G), features (N,C,g,g)) for the running boxes of each image, checked;
        None in the place of an image that failed to prepare or has no box to run, and everywhere when the unary
        does not use the network."""
        if self.unary_weights[0] <= 0:
            return [None] * len(chunk)
        todo = [k for k, p in enumerate(chunk) if isinstance(p, _Image) and len(p.run)]
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(chunk)
        if not todo:
            return out
        t = time.perf_counter()
        dev = self.device
        images = [torch.from_numpy(chunk[k].image).to(dev).permute(2, 0, 1).float().div_(255.0) for k in todo]
        boxes = [torch.from_numpy(chunk[k].boxes[chunk[k].run]).to(dev) for k in todo]
        classes = [torch.from_numpy(chunk[k].classes[chunk[k].run]).to(dev) for k in todo]
        result = self.network(images, boxes, classes)
        if not (isinstance(result, (tuple, list)) and len(result) == len(todo)):
            raise ValueError(f"network must return one (mask_probs, features) pair per image ({len(todo)})")
        for k, b, item in zip(todo, boxes, result):
            out[k] = self._check_network_output(item, len(b))
        self._tick("network", t)
        return out

    def _check_network_output(self, item: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError("network must return (mask_probs (N,G,G), features (N,C,g,g)) per image")
        probs, features = (torch.as_tensor(o, device=self.device, dtype=torch.float32) for o in item)
        if probs.dim() != 3 or probs.shape[0] != n or features.dim() != 4 or features.shape[0] != n:
            raise ValueError(f"network returned mask_probs {tuple(probs.shape)} and features {tuple(features.shape)}; "
                             f"expected ({n},G,G) and ({n},C,g,g)")
        if not bool(torch.isfinite(probs).all()) or probs.min() < 0 or probs.max() > 1:
            raise ValueError("network mask_probs must be finite probabilities in [0, 1]")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("network features must be finite")
        return probs, features

    @staticmethod
    def _box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        r0, r1, c0, c1 = box_pixel_span(torch.from_numpy(box), height, width)
        if r1 >= r0 and c1 >= c0:
            mask[r0 : r1 + 1, c0 : c1 + 1] = True
        return mask

    def _tick(self, stage: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] += now - start
        return now

    @torch.no_grad()
    def _label_rois(self, image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, depth: np.ndarray | None,
                    image_id: str, instance_ids: np.ndarray,
                    network_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[InstanceLabel]:
        cfg = self.config
        dev = self.device
        height, width = image.shape[:2]
        t = time.perf_counter()
        # 1. RoI crops
        boxes_t = torch.from_numpy(boxes).to(dev)
        grid = roi_grid(boxes_t, cfg.roi_size, cfg.box_prior.pad)
        image_t = torch.from_numpy(image).to(dev).permute(2, 0, 1).float()
        rgb, valid = crop(image_t, grid)
        lab = rgb_to_lab(rgb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        depth_c = depth_ok = None
        if depth is not None:
            d = torch.from_numpy(depth).to(dev)
            depth_c, depth_ok = crop_masked(d, (d > 0) & torch.isfinite(d), grid)
        t = self._tick("roi", t)
        # 2. unary and features
        unary, features = self._unary(lab, valid, grid, depth_c, depth_ok, network_out)
        unary = unary * grid.inside
        t = self._tick("unary", t)
        # 3. bank partners and correspondence
        cross, matches = self._cross_image(features, unary, boxes, classes, image_id)
        t = self._tick("correspondence", t)
        # 4. CRF
        q = meanfield_soft(torch.cat([1 - unary, unary], 1), crf_features(lab, depth_c, depth_ok, cfg.box_prior),
                           grid.inside.to(unary.dtype), cross, cfg.crf)[:, 1:]
        t = self._tick("crf", t)
        # 5. refinement
        if cfg.refine.steps > 0:
            colour = roi_color_edges(rgb, valid, grid.inside, cfg.objectives)
            dedges = roi_depth_edges(depth_c, grid.inside, cfg.objectives) if depth_c is not None else None
            prob = refine(q, grid.inside, colour, dedges, cfg.refine, cfg.objectives)
        else:
            prob = q * grid.inside
        t = self._tick("refine", t)
        # 6. paste, score, push
        windows = paste_windows(prob[:, 0], grid, height, width)
        scores = mask_score(prob, q, grid.inside)
        if self.uses_correspondence:
            for k in range(len(boxes)):
                self.bank.push(int(classes[k]), features[k], prob[k, 0], boxes[k], image_id, int(instance_ids[k]))
        t = self._tick("paste", t)
        # 7. overlaps
        joint = cfg.occlusion == "joint"
        if len(boxes) > 1 and (joint or cfg.joint.score_when_off):
            # With occlusion "off" the resolution runs for the score alone, on a coarser grid: the masks written
            # stay the per-box ones, bit for bit.
            hist, depth_median = instance_models(lab, prob, own_pixels(grid, boxes_t), grid.inside, depth_c,
                                                 depth_ok, cfg.joint.colour_bins, cfg.box_prior.color_alpha)
            res = resolve(windows, boxes_t, torch.from_numpy(image).to(dev),
                          None if depth is None else torch.from_numpy(depth).to(dev), hist, depth_median,
                          cfg.joint if joint else self._score_joint, cfg.box_prior.lab_scale, cfg.mask_thresh,
                          None if joint else threshold_windows(windows, height, width, cfg.mask_thresh))
            masks = res.masks
            if joint and cfg.joint.rescore:
                # Pixels another instance now owns are no longer this label's answer: score the rest of its box.
                scores = mask_score(prob, q, grid.inside & ~owned_by_others(grid, masks))
            scores = overlap_score(scores, res.contested, res.margin, res.lost, cfg.joint.score_weight,
                                   cfg.joint.lost_power)
        else:
            masks = threshold_windows(windows, height, width, cfg.mask_thresh)
        labels = [InstanceLabel(m.cpu().numpy(), float(s), ms) for m, s, ms in zip(masks, scores.tolist(), matches)]
        self._tick("occlusion", t)
        self.labelled += len(boxes)
        return labels

    def _unary(self, lab: torch.Tensor, valid: torch.Tensor, grid: RoIGrid, depth_c: torch.Tensor | None,
               depth_ok: torch.Tensor | None, network_out: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unary probabilities (N,1,R,R) over the padded crops and correspondence features (N,C,g,g) or None."""
        cfg = self.config
        g = cfg.correspondence.grid
        w_n, w_p = self.unary_weights
        use_prior, use_net = w_p > 0, w_n > 0
        logits = box_prior_logits(lab, valid, grid, cfg.box_prior) if use_prior else None
        low = (lowlevel_features(lab, grid, depth_c, depth_ok, g) if use_prior and self.uses_correspondence
               else None)
        if not use_net:
            return torch.sigmoid(w_p * logits), low
        probs, net_features = network_out
        net_logits = torch.logit(resample_box_grid(probs, grid).clamp(_PROB_FLOOR, 1 - _PROB_FLOOR))
        if net_features.shape[-2:] != (g, g):
            net_features = F.adaptive_avg_pool2d(net_features, g)
        if not use_prior:
            return torch.sigmoid(w_n * net_logits), net_features
        features = None
        if self.uses_correspondence:
            features = torch.cat([w_n ** 0.5 * relu_and_l2_norm_feat(net_features),
                                  w_p ** 0.5 * relu_and_l2_norm_feat(low)], 1)
        return torch.sigmoid(w_n * net_logits + w_p * logits), features

    def _cross_image(self, features: torch.Tensor, unary: torch.Tensor, boxes: np.ndarray, classes: np.ndarray,
                     image_id: str) -> tuple[torch.Tensor | None, list[list[Match]]]:
        """Cross-image unary (N,2,R,R) (None when no RoI has partners) and the sparse matches of every RoI."""
        cfg = self.config
        n = len(boxes)
        matches: list[list[Match]] = [[] for _ in range(n)]
        if not self.uses_correspondence:
            return None, matches
        cross = torch.zeros((n, 2) + tuple(unary.shape[2:]), dtype=unary.dtype, device=unary.device)
        found = False
        for k in range(n):
            partners = self.bank.retrieve(int(classes[k]), features[k].cpu(), unary[k, 0].cpu(), boxes[k],
                                          exclude_image_id=image_id)
            if not partners:
                continue
            found = True
            f_p = torch.stack([p.feature for p in partners]).to(features.device)
            m_p = torch.stack([p.mask for p in partners]).to(unary.device)
            corr = correspond(features[k], f_p, unary[k, 0], m_p, cfg.correspondence)
            # The transfer is O(S^4) in the mask side S: run it at cross_image_size and upsample the result.
            s = cfg.cross_image_size
            small = cross_image_unary(corr.transfer, F.adaptive_avg_pool2d(unary[k], s)[0],
                                      F.adaptive_avg_pool2d(m_p, s))
            cross[k] = F.interpolate(small[None], size=unary.shape[2:], mode="bilinear", align_corners=False)[0]
            matches[k] = self._matches(corr.match, corr.weight, unary[k, 0], partners)
        return (cross if found else None), matches

    def _matches(self, match: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, partners) -> list[Match]:
        """Sparse matches of the query's foreground cells with each partner."""
        g = self.config.correspondence.grid
        fg = F.adaptive_avg_pool2d(mask[None, None], g).flatten() > 0.5
        src = torch.nonzero(fg)[:, 0]
        out = []
        for p, m, w in zip(partners, match, weight):
            out.append(Match(p.image_id, p.instance_id, g, src.cpu().numpy(), m[src].cpu().numpy(),
                             w[src].float().cpu().numpy()))
        return out
