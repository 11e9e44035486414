"""Training data of the student: images, boxes, classes and depth from the dataset's samples, pseudo masks, scores
and correspondences from a shard directory, with the training geometry applied to all of them at once.

A sample is any object with the pipeline dataset API's fields (``image_id``, ``boxes`` (N,4), ``classes`` (N,),
``instance_ids`` (N,), ``load_image()`` (H,W,3) uint8 RGB, ``load_depth()`` (H,W) float32 or None); the student
never imports the pipeline and never sees a ground-truth mask.

Geometry per image, in this order: resize so the short side is a random choice of ``min_size`` (long side at most
``max_size``), horizontal flip with probability ``flip``, random ``crop`` (H, W) when the image is larger.
``dataset[(i, short)]`` takes the short side from the caller instead: the training loop draws one per step and
gives it to every image of the step on every worker (``step_sizes``).
Image, boxes, depth, pseudo masks and correspondences move together: depth is resampled nearest (0 stays
invalid), pseudo masks bilinearly as floats; a flip mirrors each instance's correspondence cells (x -> g - 1 - x);
an instance cut by the crop keeps its clipped box but loses its correspondences and does not enter the feature
queue (its RoI grid no longer spans the object the shard matched).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from boxmask_common.errors import UserError

from .config import StudentConfig
from .pseudo_labels import PseudoLabels

# Boxes left with less than this share of their area, or a side under 2 px, after a crop are dropped.
_MIN_KEPT_AREA = 0.25


def scale_for(height: int, width: int, short: int, max_size: int) -> float:
    """The resize factor that makes the short side ``short`` unless the long side would exceed ``max_size``."""
    return min(short / min(height, width), max_size / max(height, width))


def _area(boxes: np.ndarray) -> np.ndarray:
    """(N,4) x1,y1,x2,y2 -> (N,) areas (0 for empty boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def flip_cells(cells: np.ndarray, grid: int) -> np.ndarray:
    """Row-major cell indices of a g x g grid after a horizontal flip."""
    y, x = np.divmod(cells, grid)
    return y * grid + (grid - 1 - x)


def step_sizes(steps: int, sizes: Sequence[int], seed: int) -> list[int]:
    """One short side per step, drawn from ``sizes`` by a generator seeded with ``seed`` alone, so every worker
    that asks with the same seed gets the same list.

    DDP ranks move in lockstep: with a size drawn per image, each step lasts as long as the rank that drew the
    largest, and a worker's batch of mixed sizes is padded to its largest image. A size shared by the step costs
    neither, and each image still sees every size with equal chance."""
    generator = torch.Generator().manual_seed(seed)
    return [int(sizes[k]) for k in torch.randint(len(sizes), (steps,), generator=generator)]


class TrainImages(Dataset):
    """``dataset[i]`` or ``dataset[(i, short)]`` -> (image (3,h,w) float [0,1], target dict of
    ``student.roi_heads``)."""

    def __init__(self, samples: Sequence[Any], class_ids: Sequence[int], cfg: StudentConfig,
                 pseudo: PseudoLabels | None = None):
        self.samples = list(samples)
        self.label_of = {int(c): i + 1 for i, c in enumerate(class_ids)}
        self.cfg = cfg
        self.pseudo = pseudo

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]):
        index, short = index if isinstance(index, tuple) else (index, None)
        s = self.samples[index]
        image = s.load_image()
        depth = s.load_depth()
        keep = np.array([int(c) in self.label_of for c in s.classes], bool)
        boxes = np.asarray(s.boxes, np.float32).reshape(-1, 4)[keep]
        classes = np.asarray(s.classes, np.int64)[keep]
        instance_ids = np.asarray(s.instance_ids, np.int64)[keep]
        masks = weight = corr = None  # boxes only: no per-instance planes to carry through the geometry
        if self.pseudo is not None:
            labels = [self.pseudo.get(s.image_id, int(i)) for i in instance_ids]
            for lab in labels:
                if lab is not None and lab.mask.shape != image.shape[:2]:
                    raise UserError(self.pseudo.source, f"pseudo mask of image {s.image_id} is "
                                                        f"{lab.mask.shape}, the image is {image.shape[:2]}: "
                                                        f"shards of another dataset?")
            masks = np.zeros((len(labels), *image.shape[:2]), np.float32)
            for k, lab in enumerate(labels):
                if lab is not None:
                    masks[k] = lab.mask
            weight = np.array([lab.score if lab is not None else 0.0 for lab in labels], np.float32)
            corr = [[(c.partner, c.grid, c.src, c.dst, c.weight) for c in lab.correspondences]
                    if lab is not None else [] for lab in labels]
        return self.augment(s.image_id, image, depth, boxes, classes, instance_ids, masks, weight, corr, short)

    def augment(self, image_id, image, depth, boxes, classes, instance_ids, masks, weight, corr, short=None):
        """Resize, flip, crop (module docstring). masks (N,H,W) float32, weight (N,) and corr (N lists) are None
        when training from boxes only; ``short`` None draws the short side from ``min_size``."""
        cfg = self.cfg
        h, w = image.shape[:2]
        if short is None:
            short = int(cfg.min_size[int(torch.randint(len(cfg.min_size), ()))])
        scale = scale_for(h, w, short, cfg.max_size)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
            if depth is not None:
                depth = cv2.resize(depth, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
            if masks is not None:
                masks = np.stack([cv2.resize(m, (nw, nh), interpolation=cv2.INTER_LINEAR) for m in masks]) \
                    if len(masks) else np.zeros((0, nh, nw), np.float32)
            boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
        flipped = bool(cfg.flip > 0 and float(torch.rand(())) < cfg.flip)
        if flipped:
            image = image[:, ::-1]
            depth = depth[:, ::-1] if depth is not None else None
            boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
            if masks is not None:
                masks = masks[:, :, ::-1]
                corr = [[(p, g, flip_cells(src, g), dst, wt) for p, g, src, dst, wt in row] for row in corr]
        queue_ok = np.ones(len(boxes), bool)
        if cfg.crop and (nh > cfg.crop[0] or nw > cfg.crop[1]):
            ch, cw = min(cfg.crop[0], nh), min(cfg.crop[1], nw)
            y0 = int(torch.randint(nh - ch + 1, ()))
            x0 = int(torch.randint(nw - cw + 1, ()))
            image = image[y0:y0 + ch, x0:x0 + cw]
            depth = depth[y0:y0 + ch, x0:x0 + cw] if depth is not None else None
            shifted = boxes - np.array([x0, y0, x0, y0], np.float32)
            clipped = np.clip(shifted, 0, [cw, ch, cw, ch]).astype(np.float32)
            kept = (_area(clipped) >= _MIN_KEPT_AREA * _area(shifted)) & \
                   (clipped[:, 2] - clipped[:, 0] >= 2) & (clipped[:, 3] - clipped[:, 1] >= 2)
            whole = np.all(np.isclose(clipped, shifted), 1)
            boxes, classes, instance_ids, queue_ok = clipped[kept], classes[kept], instance_ids[kept], whole[kept]
            if masks is not None:
                masks, weight = masks[kept][:, y0:y0 + ch, x0:x0 + cw], weight[kept]
                corr = [row if ok else [] for row, ok, k in zip(corr, whole, kept) if k]
            nh, nw = ch, cw
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)).reshape(-1, 4),
            "labels": torch.tensor([self.label_of[int(c)] for c in classes], dtype=torch.int64),
            "image_id": str(image_id),
            "instance_ids": torch.from_numpy(np.ascontiguousarray(instance_ids, np.int64)),
            "flipped": flipped,
            "queue_ok": torch.from_numpy(np.ascontiguousarray(queue_ok)),
        }
        if depth is not None:
            target["depth"] = torch.from_numpy(np.ascontiguousarray(depth, np.float32))
        if masks is not None:
            target["pseudo_masks"] = torch.from_numpy(np.ascontiguousarray(masks, np.float32))
            target["pseudo_weight"] = torch.from_numpy(np.ascontiguousarray(weight, np.float32))
            target["correspondences"] = [
                [(p, int(g), torch.from_numpy(np.asarray(src, np.int64)), torch.from_numpy(np.asarray(dst, np.int64)),
                  torch.from_numpy(np.asarray(wt, np.float32))) for p, g, src, dst, wt in row] for row in corr]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return tensor, target


def collate(batch):
    """A list of (image, target) -> (list of images, list of targets), torchvision detection's batch format."""
    return [b[0] for b in batch], [b[1] for b in batch]


def epoch_batches(sampler, epoch: int, batch: int, sizes: Sequence[int], seed: int) -> list[list[tuple[int, int]]]:
    """This rank's batches of epoch ``epoch`` as (index, short side) pairs; batch k has the same short side on every
    rank (``step_sizes``)."""
    sampler.set_epoch(epoch)
    order = list(sampler)
    steps = len(order) // batch
    shorts = step_sizes(steps, sizes, seed * 100_003 + epoch)
    return [[(i, shorts[k]) for i in order[k * batch:(k + 1) * batch]] for k in range(steps)]


def batch_stream(data: TrainImages, cfg: StudentConfig, rank: int, world: int) -> Callable[[int], Iterator]:
    """This rank's batches as a function of the start step: start -> an iterator of (images, targets) from that
    step on, epoch after epoch, ``batch_size / world`` images each (a resumed run skips what its epoch did)."""
    per_worker = max(1, cfg.batch_size // world)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // per_worker  # >= 1: fit() refuses a split that cannot fill one batch

    def stream(start: int) -> Iterator:
        epoch, skip = divmod(start, per_epoch)
        while True:
            batches = epoch_batches(sampler, epoch, per_worker, cfg.min_size, cfg.seed)[skip:]
            yield from DataLoader(data, batch_sampler=batches, collate_fn=collate, num_workers=cfg.loader_workers)
            epoch, skip = epoch + 1, 0
    return stream
