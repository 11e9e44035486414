"""What labeling and training see of a dataset: images, boxes, classes and depth. Never masks.

Ground-truth masks are reachable only through ``pipeline.evaluation`` (which calls a dataset's
``_gt_masks`` hook); nothing in this module's public API returns them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import numpy as np
from tqdm import tqdm

from ..errors import InputError

T = TypeVar("T")
# Appended to the reject of an image whose depth is unusable but whose boxes are good (lenient mode).
KEPT_WITHOUT_DEPTH = "image kept without depth"


def index_progress(items: Iterable[T], desc: str, unit: str = "img", total: int | None = None) -> "tqdm[T]":
    """A progress bar on stderr over the items a loader indexes (a large split takes a while to parse).

    Shown only when stderr is a terminal (a log file or a test capturing output gets nothing); it is
    cleared when done. Use it as a context manager, so that an error raised mid-loop clears it too and
    its one-line message starts on a clean line.
    """
    return tqdm(items, desc=desc, unit=unit, total=total, leave=False, disable=None, dynamic_ncols=True)


def box_to_mask(box, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of every pixel the x1, y1, x2, y2 box touches: columns floor(x1) .. ceil(x2) - 1
    and rows floor(y1) .. ceil(y2) - 1 (pixel (r, c) is the unit square [c, c+1) x [r, r+1))."""
    x1, y1, x2, y2 = (float(v) for v in box)
    mask = np.zeros((height, width), bool)
    rows = slice(max(0, math.floor(y1)), min(height, math.ceil(y2)))
    cols = slice(max(0, math.floor(x1)), min(width, math.ceil(x2)))
    mask[rows, cols] = True
    return mask


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass(frozen=True)
class Reject:
    """An input that could not be used: ``where`` is the file (or image id), ``problem`` a short reason."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class Sample:
    """One image with its boxes.

    Attributes:
        image_id: dataset image id (string, unique within the dataset).
        file_name: image path relative to the dataset root.
        height, width: image size in pixels.
        boxes: (N, 4) float32 x1, y1, x2, y2 in pixels, valid (x2 > x1, y2 > y1, inside the image).
        classes: (N,) int32 dataset category ids.
        instance_ids: (N,) int32 index of each box within the image's annotations (stable across runs).
        ignore_boxes: (M, 4) float32 regions to ignore in training (COCO crowd, Cityscapes groups).
        ignore_classes: (M,) int32 their category ids.
        has_depth: whether ``load_depth`` returns a depth map.
    """

    image_id: str
    file_name: str
    height: int
    width: int
    boxes: np.ndarray
    classes: np.ndarray
    instance_ids: np.ndarray
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    ignore_classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    has_depth: bool = False
    _image_loader: Optional[Callable[[], np.ndarray]] = field(default=None, repr=False)
    _depth_loader: Optional[Callable[[], Optional[np.ndarray]]] = field(default=None, repr=False)

    def load_image(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB. Raises ``InputError`` naming the file when it cannot be read."""
        assert self._image_loader is not None
        return self._image_loader()

    def load_depth(self) -> Optional[np.ndarray]:
        """(H, W) float32 metres, 0 = invalid; None when the dataset has no depth for this image.
        Raises ``InputError`` naming the file when depth should exist but cannot be read."""
        if self._depth_loader is None:
            return None
        return self._depth_loader()


class Fingerprint:
    """A dataset's content digest, built one image at a time so that a streamed source (the dataset index) gets
    the same digest as the loader with every sample in memory: ``add`` each image (a ``Sample``, or anything with
    its fields and ``has_depth``) in order, then ``digest(kind, split, categories)``."""

    def __init__(self):
        self._rows = hashlib.sha256()

    def add(self, s) -> None:
        h = self._rows
        h.update(json.dumps([s.image_id, s.file_name, int(s.height), int(s.width), bool(s.has_depth)]).encode())
        for values, dtype in ((s.boxes, np.float32), (s.classes, np.int64), (s.instance_ids, np.int64),
                              (s.ignore_boxes, np.float32), (s.ignore_classes, np.int64)):
            array = np.ascontiguousarray(values, dtype)
            h.update(repr(array.shape).encode() + array.tobytes())

    def digest(self, kind: str, split: str, categories: list[tuple[int, str]]) -> str:
        """16 hex of the images added so far under a header naming the loader ``kind``, split and categories."""
        head = json.dumps([kind, split, [[int(i), str(n)] for i, n in categories]]).encode()
        return hashlib.sha256(head + self._rows.hexdigest().encode()).hexdigest()[:16]


class Dataset:
    """Base class of the three datasets. Subclasses fill ``categories`` and ``_samples`` (lenient mode
    skips bad items and appends a ``Reject``; strict mode raises the ``InputError``)."""

    name: str = ""

    def __init__(self, root: str, split: str, strict: bool = False):
        self.root = root
        self.split = split
        self.strict = strict
        self.categories: list[Category] = []
        self.rejects: list[Reject] = []
        self._samples: list[Sample] = []

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __getitem__(self, index: int) -> Sample:
        return self._samples[index]

    def image_ids(self) -> list[str]:
        return [s.image_id for s in self._samples]

    def get(self, image_id: str) -> Sample:
        built, by_id = getattr(self, "_by_id", (-1, {}))
        if built != len(self._samples):        # (re)built once the loader is done adding samples
            by_id = {}
            for s in self._samples:
                by_id.setdefault(s.image_id, s)
            self._by_id = (len(self._samples), by_id)
        return by_id[image_id]

    def category_name(self, category_id: int) -> str:
        for c in self.categories:
            if c.id == int(category_id):
                return c.name
        return str(category_id)

    def fingerprint(self) -> str:
        """Digest (16 hex) of what labeling reads from this dataset (``Fingerprint``): its kind, split and
        categories, and each sample's id, file name (relative to the root), size, boxes, classes, instance ids,
        ignore regions and whether it has depth. The root path is left out (the same data moved elsewhere has the
        same fingerprint) and so are the pixels (hashing every image would cost a read of the dataset); an edited
        box or another toy generation gives another fingerprint."""
        hasher = Fingerprint()
        for s in self._samples:
            hasher.add(s)
        return hasher.digest(self.name, self.split, [(c.id, c.name) for c in self.categories])

    @property
    def has_depth(self) -> bool:
        return any(s.has_depth for s in self._samples)

    def record_reject(self, error: InputError) -> None:
        """A bad input found by the loader (or by a caller decoding images): lenient mode keeps ``error`` as a
        ``Reject``; strict mode raises it."""
        if self.strict:
            raise error
        self.rejects.append(Reject(error.where, error.problem))

    def record_depth_reject(self, error: InputError) -> None:
        """Like ``record_reject`` for a depth problem of an image that is kept (without depth) in lenient mode:
        the reject says so; strict mode raises ``error`` as it is."""
        if self.strict:
            raise error
        self.rejects.append(Reject(error.where, f"{error.problem}; {KEPT_WITHOUT_DEPTH}"))

    def _gt_masks(self, sample: Sample) -> dict[int, np.ndarray]:
        """Ground-truth masks by instance id, (H, W) bool. For ``pipeline.evaluation`` only."""
        raise NotImplementedError

    def _gt_ignore_masks(self, sample: Sample) -> list[np.ndarray]:
        """Masks of the ignore regions, (H, W) bool each, in ``sample.ignore_boxes`` order. For
        ``pipeline.evaluation`` only. Default: the filled boxes (every pixel a box touches); datasets with
        region masks (COCO crowd RLEs, Cityscapes group polygons) override it."""
        return [box_to_mask(box, sample.height, sample.width) for box in sample.ignore_boxes]
