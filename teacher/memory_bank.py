"""Per-class memory bank of objects for cross-image correspondence (DiscoBox section 3.6, appendix C.3).

One FIFO queue per class, each a set of ring buffers preallocated at the first push of that class (features,
masks, boxes, image ids, instance ids): memory is capacity x (object size) per class whatever the dataset size.
Only boxes with both sides >= ``min_box_side`` px are pushed.

Retrieval modes (``BankConfig.mode``):
- "random" (paper): up to ``max_partners`` objects sampled uniformly without replacement (seeded generator) among
  the class's stored objects, excluding the query's own image; none when fewer than ``min_partners`` qualify.
- "official" (DiscoBox ``ObjectQueues.get_similar_obj``): stored objects, in slot order, whose soft fg IoU and bg
  IoU with the query mask exceed their thresholds, whose masked appearance similarity exceeds ``appear_thresh``
  and whose aspect-ratio quotient lies in [ratio_min, ratio_max]; the first ``max_partners`` are kept (the code
  uses 5), none when fewer than ``min_partners``. Features must be pushed relu+L2-normalised, as DiscoBox does;
  the query feature is normalised (again) here, as ``ObjectFactory.create_one`` does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import BankConfig
from .correspondence import relu_and_l2_norm_feat

MODES = ("random", "official")


@dataclass(frozen=True)
class BankEntry:
    """One stored object: feature (C,g,g), mask (R,R), box (4,) x1,y1,x2,y2, its ids and its slot in the queue."""

    feature: torch.Tensor
    mask: torch.Tensor
    box: torch.Tensor
    image_id: str
    instance_id: int
    slot: int


class ClassQueue:
    """Ring buffers of one class. ``ptr`` is the next slot to write; ``count`` the number of filled slots."""

    def __init__(self, capacity: int, feature_shape: tuple[int, ...], mask_shape: tuple[int, ...]):
        self.feature = torch.zeros((capacity, *feature_shape), dtype=torch.float32)
        self.mask = torch.zeros((capacity, *mask_shape), dtype=torch.float32)
        self.box = torch.zeros((capacity, 4), dtype=torch.float32)
        self.image_id: list[str] = [""] * capacity
        self.instance_id = torch.zeros(capacity, dtype=torch.int64)
        self.ptr = 0
        self.count = 0

    @property
    def capacity(self) -> int:
        return self.feature.shape[0]

    def write(
        self, feature: torch.Tensor, mask: torch.Tensor, box: torch.Tensor, image_id: str, instance_id: int
    ) -> None:
        slot = self.ptr
        self.feature[slot] = feature
        self.mask[slot] = mask
        self.box[slot] = box
        self.image_id[slot] = image_id
        self.instance_id[slot] = instance_id
        self.ptr = (slot + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def entry(self, slot: int) -> BankEntry:
        return BankEntry(
            feature=self.feature[slot].clone(),
            mask=self.mask[slot].clone(),
            box=self.box[slot].clone(),
            image_id=self.image_id[slot],
            instance_id=int(self.instance_id[slot]),
            slot=slot,
        )


# ----------------------------------------------------------------------------------------------------------------
# The official retrieval criteria (pure functions; query against S stored objects)


def fg_soft_iou(q_mask: torch.Tensor, k_masks: torch.Tensor) -> torch.Tensor:
    """sum(q k) / #[(q + k) >= 1] on soft masks. q_mask (R,R), k_masks (S,R,R) -> (S,)."""
    return (q_mask * k_masks).sum((1, 2)) / ((q_mask + k_masks) >= 1).float().sum((1, 2))


def bg_soft_iou(q_mask: torch.Tensor, k_masks: torch.Tensor) -> torch.Tensor:
    """sum((1-q)(1-k)) / #[(2 - q - k) >= 1] on soft masks. q_mask (R,R), k_masks (S,R,R) -> (S,)."""
    return ((1 - q_mask) * (1 - k_masks)).sum((1, 2)) / ((2 - q_mask - k_masks) >= 1).float().sum((1, 2))


def appearance_similarity(
    q_feature: torch.Tensor, q_mask: torch.Tensor, k_features: torch.Tensor, k_masks: torch.Tensor
) -> torch.Tensor:
    """sum(f_q f_k m_q m_k) / (sum m_q m_k + 1e-6), masks bilinearly resized to the feature grid.

    q_feature (C,g,g), q_mask (R,R), k_features (S,C,g,g), k_masks (S,R,R) -> (S,).
    """
    g = q_feature.shape[-2:]
    mq = F.interpolate(q_mask[None, None], g, mode="bilinear", align_corners=False)[:, 0]
    mk = F.interpolate(k_masks[:, None], g, mode="bilinear", align_corners=False)[:, 0]
    num = (q_feature[None] * k_features * mq[:, None] * mk[:, None]).sum((1, 2, 3))
    return num / ((mq * mk).sum((1, 2)) + 1e-6)


def aspect_ratio(boxes: torch.Tensor) -> torch.Tensor:
    """w / h = (x2 - x1) / (y2 - y1 + 1e-5). boxes (...,4) -> (...)."""
    return (boxes[..., 2] - boxes[..., 0]) / (boxes[..., 3] - boxes[..., 1] + 1e-5)


# ----------------------------------------------------------------------------------------------------------------


class MemoryBank:
    """Per-class FIFO memory bank (module docstring). Tensors are stored on the CPU in float32."""

    def __init__(self, cfg: BankConfig):
        if cfg.mode not in MODES:
            raise ValueError(f"MemoryBank: mode must be one of {MODES}, got {cfg.mode!r}")
        if cfg.capacity < 1 or cfg.max_partners < 1 or cfg.min_partners < 0:
            raise ValueError(
                f"MemoryBank: need capacity >= 1, max_partners >= 1, min_partners >= 0; got {cfg.capacity}, "
                f"{cfg.max_partners}, {cfg.min_partners}"
            )
        self.cfg = cfg
        self.queues: dict[int, ClassQueue] = {}
        self._rng = np.random.default_rng(cfg.seed)

    def __len__(self) -> int:
        return sum(q.count for q in self.queues.values())

    def fill(self) -> dict[int, int]:
        """Stored objects per class id."""
        return {c: q.count for c, q in sorted(self.queues.items())}

    def image_ids(self) -> set[str]:
        """Ids of the images that stored objects come from (a partner's image is always one of these)."""
        return {i for q in self.queues.values() for i in q.image_id[: q.count] if i}

    def push(
        self,
        class_id: int,
        feature: torch.Tensor,
        mask: torch.Tensor,
        box,
        image_id,
        instance_id: int,
    ) -> bool:
        """Store one object in its class's queue (overwriting the oldest when full).

        feature (C,g,g), mask (R,R), box (4,) x1,y1,x2,y2 in image pixels. Returns False (and stores nothing)
        when a box side is shorter than ``min_box_side``. Shapes must match the class's earlier pushes.
        """
        box = torch.as_tensor(box, dtype=torch.float32).reshape(-1)
        if box.numel() != 4 or not bool(torch.isfinite(box).all()):
            raise ValueError(f"MemoryBank.push: box must be 4 finite numbers x1,y1,x2,y2, got {box.tolist()}")
        if feature.dim() != 3 or mask.dim() != 2:
            raise ValueError(
                f"MemoryBank.push: expected feature (C,g,g) and mask (R,R), got {tuple(feature.shape)} and "
                f"{tuple(mask.shape)}"
            )
        if float(box[2] - box[0]) < self.cfg.min_box_side or float(box[3] - box[1]) < self.cfg.min_box_side:
            return False
        queue = self.queues.get(int(class_id))
        if queue is None:
            queue = self.queues[int(class_id)] = ClassQueue(self.cfg.capacity, tuple(feature.shape), tuple(mask.shape))
        elif tuple(feature.shape) != tuple(queue.feature.shape[1:]) or tuple(mask.shape) != tuple(queue.mask.shape[1:]):
            raise ValueError(
                f"MemoryBank.push: class {class_id} stores features {tuple(queue.feature.shape[1:])} and masks "
                f"{tuple(queue.mask.shape[1:])}, got {tuple(feature.shape)} and {tuple(mask.shape)}"
            )
        queue.write(feature.detach().float().cpu(), mask.detach().float().cpu(), box, str(image_id), int(instance_id))
        return True

    def candidates(self, class_id: int, exclude_image_id=None) -> list[int]:
        """Filled slots of the class (slot order), without those of `exclude_image_id`."""
        queue = self.queues.get(int(class_id))
        if queue is None:
            return []
        slots = range(queue.count)
        if exclude_image_id is None:
            return list(slots)
        return [s for s in slots if queue.image_id[s] != str(exclude_image_id)]

    def official_scores(
        self, class_id: int, feature: torch.Tensor, mask: torch.Tensor, box, slots: list[int]
    ) -> dict[str, torch.Tensor]:
        """The official criteria of the query against `slots`: dict(fg_ious, bg_ious, appear_sim, ratio), each (S,).

        The query feature is relu+L2-normalised first (``ObjectFactory.create_one``).
        """
        queue = self.queues[int(class_id)]
        idx = torch.as_tensor(slots, dtype=torch.int64)
        q_mask = mask.detach().float().cpu()
        q_feature = relu_and_l2_norm_feat(feature.detach().float().cpu()[None])[0]
        k_masks = queue.mask[idx]
        q_ratio = aspect_ratio(torch.as_tensor(box, dtype=torch.float32).reshape(4))
        return dict(
            fg_ious=fg_soft_iou(q_mask, k_masks),
            bg_ious=bg_soft_iou(q_mask, k_masks),
            appear_sim=appearance_similarity(q_feature, q_mask, queue.feature[idx], k_masks),
            ratio=q_ratio / aspect_ratio(queue.box[idx]),
        )

    def retrieve(
        self, class_id: int, feature: torch.Tensor, mask: torch.Tensor, box, exclude_image_id=None
    ) -> list[BankEntry]:
        """Partners of a query object of `class_id` (mode from the config; module docstring) -> list[BankEntry].

        feature (C,g,g) and mask (R,R) of the query (used by "official"), box (4,). Empty when fewer than
        ``min_partners`` partners qualify.
        """
        slots = self.candidates(class_id, exclude_image_id)
        if self.cfg.mode == "random":
            if not slots or len(slots) < self.cfg.min_partners:
                return []
            pick = self._rng.choice(len(slots), size=min(self.cfg.max_partners, len(slots)), replace=False)
            chosen = [slots[i] for i in pick]
        else:
            if not slots:
                return []
            queue = self.queues[int(class_id)]
            stored = (tuple(queue.feature.shape[1:]), tuple(queue.mask.shape[1:]))
            if (tuple(feature.shape), tuple(mask.shape)) != stored:
                raise ValueError(
                    f"MemoryBank.retrieve: query feature {tuple(feature.shape)} / mask {tuple(mask.shape)} do not "
                    f"match the stored {stored[0]} / {stored[1]}"
                )
            s = self.official_scores(class_id, feature, mask, box, slots)
            ok = (
                (s["fg_ious"] > self.cfg.fg_iou_thresh)
                & (s["bg_ious"] > self.cfg.bg_iou_thresh)
                & (s["appear_sim"] > self.cfg.appear_thresh)
                & (s["ratio"] >= self.cfg.ratio_min)
                & (s["ratio"] <= self.cfg.ratio_max)
            )
            chosen = [slots[i] for i in torch.nonzero(ok)[:, 0].tolist()][: self.cfg.max_partners]
            if len(chosen) < self.cfg.min_partners:
                return []
        queue = self.queues[int(class_id)]
        return [queue.entry(s) for s in chosen]
