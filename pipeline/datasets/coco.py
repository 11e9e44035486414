"""COCO instances json as a ``Dataset`` (``--dataset coco --data-root DIR --ann FILE``).

* Image ``file_name`` is relative to ``root``; image ids become strings.
* Boxes: COCO ``bbox`` [x, y, w, h] -> x1, y1, x2, y2. A box poking out of the image by at most 1 px (float
  slop of annotation tools) is clipped; further out, or with w <= 0 or h <= 0, the annotation is rejected.
* ``iscrowd=1`` annotations are ignore regions (``Sample.ignore_boxes``), never training instances.
* ``instance_id`` is the annotation's index within its image's annotations in file order (crowd and
  rejected annotations keep their slots), so ids are stable when one annotation is fixed or broken.
* Optional depth per image through two image-entry fields: ``depth_file`` (relative to ``root``; a 16-bit
  PNG or a 2-D ``.npy``) and ``depth_scale`` (metres per stored unit, default 1.0). Stored 0 means invalid.
  A bad ``depth_file`` (missing, wrong format) or ``depth_scale`` costs only the depth: lenient mode keeps
  the image with ``has_depth=False`` and records a reject ("...; image kept without depth"), as the
  Cityscapes loader does for a missing disparity file.
* Segmentations are read only by ``pipeline.evaluation`` (through ``_gt_masks``). A box-only file (no
  ``segmentation``) is valid input: its instances simply have no ground-truth mask.
* The annotation file is one split: ``split`` only names it, unless ``holdout`` (a fraction) splits it by image
  id: split ``holdout`` reads the images whose id hashes below that fraction (``is_held_out``), any other split
  the rest. A hash, not the file order, so an image stays on its side when the file grows or is reordered.

Bad input (missing image file, malformed json, bad box, unknown image or category, malformed
segmentation) gives a one-line ``InputError`` naming the file; lenient mode records a ``Reject`` and skips
only the bad item, strict mode raises at the first. An unreadable image is found when ``load_image`` runs.
A malformed or structurally invalid annotation file always raises: there is nothing left to load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from ..errors import InputError
from ..index import Buckets, IndexRow
from .base import Category, Dataset, Reject, Sample, box_to_mask, index_progress
from .images import format_box, read_image_rgb, read_json, read_png_channel, validate_box

log = logging.getLogger(__name__)

# Boxes may poke out of the image by this much (px) and are clipped; beyond it they are rejected.
BOX_TOLERANCE = 1.0
DEPTH_SUFFIXES = (".png", ".npy")
HOLDOUT_SPLIT = "holdout"


def is_held_out(image_id: str, fraction: float) -> bool:
    """Whether ``image_id`` falls in the held-out ``fraction`` of images: its sha256, as a number in [0, 1)."""
    digest = hashlib.sha256(str(image_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why ``seg`` is not a usable COCO segmentation of an ``height`` x ``width`` image (None when it is)."""
    if isinstance(seg, list):
        for poly in seg:
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(_is_number(v) for v in poly)):
                return "malformed segmentation: polygons must be lists of at least 3 x, y pairs"
        return None
    if isinstance(seg, dict):
        if list(seg.get("size", [])) != [height, width]:
            return f"malformed segmentation: RLE size {seg.get('size')!r} is not the image size [{height}, {width}]"
        if not isinstance(seg.get("counts"), (str, list)):
            return "malformed segmentation: RLE without counts"
        return None
    return f"malformed segmentation of type {type(seg).__name__}"


def _decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """COCO polygons / uncompressed RLE / compressed RLE -> (H, W) bool."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str)
               else seg["counts"]}
    return mask_utils.decode(rle).astype(bool)


def read_depth(path: str | os.PathLike, scale: float, height: int, width: int) -> np.ndarray:
    """A depth file as (H, W) float32 metres (stored value x ``scale``; 0, negative or non-finite = 0)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            stored = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputError(path, "file not found") from None
        except (OSError, ValueError) as exc:
            raise InputError(path, f"unreadable depth .npy ({exc})") from None
        if stored.ndim != 2 or not (np.issubdtype(stored.dtype, np.integer)
                                    or np.issubdtype(stored.dtype, np.floating)):
            raise InputError(path, f"expected a 2-D numeric depth array, got {stored.dtype} {stored.shape}")
    else:
        stored = read_png_channel(path, np.uint16)
    if stored.shape != (height, width):
        raise InputError(path, f"depth map is {stored.shape[1]}x{stored.shape[0]}, the image is {width}x{height}")
    depth = stored.astype(np.float32) * np.float32(scale)
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth


def _load_image(path: Path, height: int, width: int) -> np.ndarray:
    image = read_image_rgb(path)
    if image.shape[:2] != (height, width):
        raise InputError(path, f"image is {image.shape[1]}x{image.shape[0]}, the annotation file says "
                               f"{width}x{height}")
    return image


class CocoDataset(Dataset):
    """A COCO instances annotation file plus its image folder (see the module docstring)."""

    name = "coco"

    def __init__(self, root: str | os.PathLike, ann: str | os.PathLike, split: str = "train",
                 strict: bool = False, min_box_side: float = 0.0, holdout: float = 0.0):
        super().__init__(os.fspath(root), split, strict)
        self.ann = os.fspath(ann)
        self.holdout = float(holdout)
        self.min_box_side = float(min_box_side)
        # image id -> {instance_id: segmentation}; crowd regions in ignore_boxes order. Evaluation only.
        self._segmentations: dict[str, dict[int, Any]] = {}
        self._ignore_segmentations: dict[str, list[Any]] = {}
        self._load(read_json(self.ann))
        if self.rejects:
            log.warning("%s: skipped %d bad item(s); see the rejects", self.ann, len(self.rejects))

    def _bad(self, problem: str) -> InputError:
        return InputError(self.ann, problem)

    def _load(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise self._bad("not a COCO instances file: the top level must be an object")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise self._bad(f"not a COCO instances file: '{key}' must be a list")
        self._load_categories(data["categories"])
        images = self._load_images(data["images"])
        listed = {str(img.get("id")) for img in data["images"] if isinstance(img, dict)}
        with index_progress(data["annotations"], f"index {Path(self.ann).name} annotations", unit="ann") as bar:
            per_image = self._load_annotations(enumerate(bar), images, listed)
        for image_id, entry in images.items():
            if self.holdout and is_held_out(image_id, self.holdout) != (self.split == HOLDOUT_SPLIT):
                continue
            self._samples.append(self._make_sample(image_id, entry, per_image.get(image_id, [])))

    def _load_categories(self, entries: list) -> None:
        seen: set[int] = set()
        for k, cat in enumerate(entries):
            if not (isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
                self.record_reject(self._bad(f"category entry #{k} needs an integer 'id' and a string 'name'"))
            elif cat["id"] in seen:
                self.record_reject(self._bad(f"category id {cat['id']} appears twice"))
            else:
                seen.add(cat["id"])
                self.categories.append(Category(cat["id"], cat["name"]))

    def _load_images(self, entries: list) -> dict[str, dict]:
        images: dict[str, dict] = {}
        with index_progress(entries, f"index {Path(self.ann).name} images") as bar:
            for k, img in enumerate(bar):
                try:
                    image_id, entry = self._check_image(k, img)
                    if image_id in images:
                        raise self._bad(f"image id {image_id} appears twice")
                except InputError as exc:
                    self.record_reject(exc)
                    continue
                images[image_id] = entry
        return images

    def _check_image(self, k: int, img: Any) -> tuple[str, dict]:
        if not isinstance(img, dict) or not (_is_int(img.get("id")) or isinstance(img.get("id"), str)):
            raise self._bad(f"image entry #{k} has no integer or string 'id'")
        image_id = str(img["id"])
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise self._bad(f"image {image_id} has no 'file_name'")
        h, w = img.get("height"), img.get("width")
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise self._bad(f"image {image_id} needs positive integer 'height' and 'width', got {h!r} x {w!r}")
        path = Path(self.root) / img["file_name"]
        if not path.is_file():
            raise InputError(path, "image file not found" if not path.exists() else "not a file")
        entry = {"file_name": img["file_name"], "height": h, "width": w, "depth": None}
        if img.get("depth_file") is not None:
            try:
                entry["depth"] = self._check_depth(image_id, img)
            except InputError as exc:
                # The image and its boxes are still good: only the depth is lost.
                self.record_depth_reject(exc)
        return image_id, entry

    def _check_depth(self, image_id: str, img: dict) -> tuple[Path, float]:
        depth_file = img["depth_file"]
        if not isinstance(depth_file, str) or not depth_file:
            raise self._bad(f"image {image_id}: 'depth_file' must be a path relative to the data root")
        path = Path(self.root) / depth_file
        if path.suffix.lower() not in DEPTH_SUFFIXES:
            raise InputError(path, f"depth file must be a 16-bit .png or a .npy, got '{path.suffix}'")
        if not path.is_file():
            raise InputError(path, f"depth file of image {image_id} not found")
        scale = img.get("depth_scale", 1.0)
        if not (_is_number(scale) and scale > 0):
            raise self._bad(f"image {image_id}: 'depth_scale' must be a positive number of metres per stored "
                            f"unit, got {scale!r}")
        return path, float(scale)

    def _load_annotations(self, entries: Iterable[tuple[int, Any]], images: dict[str, dict], listed: set[str]
                          ) -> dict[str, list[tuple[int, dict]]]:
        """Valid annotations grouped by image id, each with its index among the image's annotations.
        ``entries``: (position in the file's annotation list, entry) in file order; ``listed``: ids of every image
        entry, valid or rejected."""
        category_ids = {c.id for c in self.categories}
        counters: dict[str, int] = {}
        per_image: dict[str, list[tuple[int, dict]]] = {}
        for k, ann in entries:
            if not isinstance(ann, dict):
                self.record_reject(self._bad(f"annotation entry #{k} is not an object"))
                continue
            image_id = str(ann.get("image_id"))
            # Slots are counted before validation so that fixing or breaking one annotation never
            # renumbers the others of its image.
            index = counters.get(image_id, 0)
            counters[image_id] = index + 1
            if image_id not in images:
                # A rejected image already has its Reject; only ids missing from the file are news.
                if image_id not in listed:
                    self.record_reject(self._bad(f"annotation {ann.get('id', '#' + str(k))} refers to unknown "
                                                 f"image {ann.get('image_id')!r}"))
                continue
            try:
                per_image.setdefault(image_id, []).append(
                    (index, self._check_annotation(k, ann, images[image_id], category_ids)))
            except InputError as exc:
                self.record_reject(exc)
        return per_image

    def _check_annotation(self, k: int, ann: dict, image: dict, category_ids: set[int]) -> dict:
        name = f"annotation {ann.get('id', '#' + str(k))} (image {ann.get('image_id')})"
        if ann.get("category_id") not in category_ids:
            raise self._bad(f"{name} refers to unknown category {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise self._bad(f"{name}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise self._bad(f"{name}: bbox {format_box(bbox)} (x, y, w, h) has {'w' if w <= 0 else 'h'} <= 0")
        try:
            box = validate_box([x, y, x + w, y + h], image["width"], image["height"], self.ann,
                               min_side=self.min_box_side, tolerance=BOX_TOLERANCE)
        except InputError as exc:
            raise self._bad(f"{name}: {exc.problem}") from None
        seg = ann.get("segmentation")
        if seg is not None and seg != []:
            problem = _segmentation_problem(seg, image["height"], image["width"])
            if problem:
                # The box is still good training input: keep it, record that its mask is unusable.
                self.record_reject(self._bad(f"{name}: {problem}; the box is kept without a ground-truth mask"))
                seg = None
        else:
            seg = None
        crowd = ann.get("iscrowd", 0)
        return {"box": box, "category_id": ann["category_id"], "crowd": bool(crowd), "segmentation": seg}

    def _make_sample(self, image_id: str, entry: dict, anns: list[tuple[int, dict]]) -> Sample:
        inst = [(i, a) for i, a in anns if not a["crowd"]]
        crowd = [a for _, a in anns if a["crowd"]]
        h, w = entry["height"], entry["width"]
        self._segmentations[image_id] = {i: a["segmentation"] for i, a in inst if a["segmentation"] is not None}
        self._ignore_segmentations[image_id] = [a["segmentation"] for a in crowd]
        depth = entry["depth"]
        return Sample(
            image_id=image_id,
            file_name=entry["file_name"],
            height=h,
            width=w,
            boxes=np.array([a["box"] for _, a in inst], np.float32).reshape(-1, 4),
            classes=np.array([a["category_id"] for _, a in inst], np.int32),
            instance_ids=np.array([i for i, _ in inst], np.int32),
            ignore_boxes=np.array([a["box"] for a in crowd], np.float32).reshape(-1, 4),
            ignore_classes=np.array([a["category_id"] for a in crowd], np.int32),
            has_depth=depth is not None,
            _image_loader=partial(_load_image, Path(self.root) / entry["file_name"], h, w),
            _depth_loader=None if depth is None else partial(read_depth, depth[0], depth[1], h, w),
        )

    def _gt_masks(self, sample: Sample) -> dict[int, np.ndarray]:
        segs = self._segmentations[sample.image_id]
        return {i: _decode_segmentation(s, sample.height, sample.width) for i, s in segs.items()}

    def _gt_ignore_masks(self, sample: Sample) -> list[np.ndarray]:
        segs = self._ignore_segmentations[sample.image_id]
        return [box_to_mask(box, sample.height, sample.width) if seg is None
                else _decode_segmentation(seg, sample.height, sample.width)
                for box, seg in zip(sample.ignore_boxes, segs)]


class CocoStream(CocoDataset):
    """The loader's rules over a COCO file read as a stream (``ijson``), for the dataset index
    (``pipeline.index``): ``index_rows`` yields rejects as they are found and, per hash bucket of image ids, the
    (position, row) pairs of its images in file order. No step holds the file in one Python object: images and
    annotations are spread over hash buckets on disk, and one bucket at a time is grouped. Holdout splitting is
    left to the reader of the index (it keeps every image). Segmentations stay out of the index."""

    def __init__(self, root: str | os.PathLike, ann: str | os.PathLike, min_box_side: float = 0.0):
        Dataset.__init__(self, os.fspath(root), "train", strict=False)
        self.ann = os.fspath(ann)
        self.holdout = 0.0
        self.min_box_side = float(min_box_side)
        self._segmentations = {}
        self._ignore_segmentations = {}

    def index_rows(self, scratch: str | os.PathLike, buckets: int = 64, batch: int = 4096
                   ) -> Iterator[Reject | list[tuple[int, IndexRow]]]:
        self._load_categories(list(self._items("categories")))
        yield from self._drain()
        schema = pa.schema([("id", pa.string()), ("entry", pa.string())])
        images = Buckets(Path(scratch), schema, "id", buckets)
        anns = Buckets(Path(scratch), pa.schema([("image_id", pa.string()), ("ann", pa.string())]), "image_id",
                       buckets)
        try:
            count = 0
            for chunk in _chunks(self._items("images"), batch):
                ids, entries, seq = [], [], []
                for img in chunk:
                    try:
                        image_id, entry = self._check_image(count, img)
                        ids.append(image_id)
                        entries.append(json.dumps([entry["file_name"], entry["height"], entry["width"],
                                                   None if entry["depth"] is None else
                                                   [os.fspath(entry["depth"][0]), entry["depth"][1]]]))
                    except InputError as exc:
                        self.record_reject(exc)
                        if not isinstance(img, dict):
                            count += 1
                            continue
                        ids.append(str(img.get("id")))   # listed, so its annotations are not "unknown image"
                        entries.append(None)
                    seq.append(count)
                    count += 1
                images.add(pa.table({"id": ids, "entry": pa.array(entries, pa.string())}), np.array(seq, np.int64))
                yield from self._drain()
            if count == 0:
                raise self._bad("not a COCO instances file: no 'images' entries")
            count = 0
            for chunk in _chunks(self._items("annotations"), batch):
                ids, texts, seq = [], [], []
                for ann in chunk:
                    if not isinstance(ann, dict):
                        self.record_reject(self._bad(f"annotation entry #{count} is not an object"))
                    else:
                        ids.append(str(ann.get("image_id")))
                        texts.append(json.dumps(ann))
                        seq.append(count)
                    count += 1
                anns.add(pa.table({"image_id": ids, "ann": texts}), np.array(seq, np.int64))
                yield from self._drain()
            images.finish()
            anns.finish()
            for b in range(buckets):
                yield self._bucket_rows(images.bucket(b), anns.bucket(b))
                yield from self._drain()
        finally:
            images.close()
            anns.close()

    def _bucket_rows(self, images: pa.Table, anns: pa.Table) -> list[tuple[int, IndexRow]]:
        """One bucket's images in file order, with their annotations checked as ``CocoDataset`` checks them."""
        valid: dict[str, dict] = {}
        first: dict[str, int] = {}
        for image_id, text, seq in zip(images.column("id").to_pylist(), images.column("entry").to_pylist(),
                                       images.column("_seq").to_pylist()):
            if text is None:
                continue
            if image_id in valid:
                self.record_reject(self._bad(f"image id {image_id} appears twice"))
                continue
            file_name, height, width, depth = json.loads(text)
            valid[image_id] = {"file_name": file_name, "height": height, "width": width,
                               "depth": None if depth is None else (Path(depth[0]), depth[1])}
            first[image_id] = seq
        per_image = self._load_annotations(
            zip(anns.column("_seq").to_pylist(), map(json.loads, anns.column("ann").to_pylist())), valid,
            set(images.column("id").to_pylist()))
        run = []
        for image_id, entry in valid.items():
            sample = self._make_sample(image_id, entry, per_image.get(image_id, []))
            self._segmentations.pop(image_id, None)
            self._ignore_segmentations.pop(image_id, None)
            depth = entry["depth"]
            run.append((first[image_id], IndexRow.from_sample(sample, None if depth is None else (
                Path(depth[0]).relative_to(self.root).as_posix(), "metres", (float(depth[1]),)))))
        return run

    def _items(self, key: str) -> Iterator[Any]:
        import ijson

        try:
            with open(self.ann, "rb") as f:
                yield from ijson.items(f, f"{key}.item", use_float=True)
        except FileNotFoundError:
            raise InputError(self.ann, "file not found") from None
        except ijson.JSONError as exc:
            raise self._bad(f"malformed json ({exc})") from None

    def _drain(self) -> Iterator[Reject]:
        rejects, self.rejects = self.rejects, []
        yield from rejects


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
