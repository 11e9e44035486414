"""Cityscapes (real or ``pipeline make-toy`` output): images, instance boxes, group ignore regions, depth.

Layout under ``root`` (the official one)::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_polygons.json      (or _gtFine_instanceIds.png)
    disparity/<split>/<city>/<city>_<seq>_<frame>_disparity.png          (optional, with camera/)
    camera/<split>/<city>/<city>_<seq>_<frame>_camera.json

Instances come from the polygons json, rasterised in drawing order (a later polygon covers an earlier one,
as in Cityscapes' ``json2instanceImg``); an instance's box is the tight box of its *visible* pixels, in
the convention of ``base.box_to_mask`` (x2 = last column + 1). Its instance id is its index among the
json's (non-deleted) objects of the 8 instance classes, so ids are stable whatever else is rejected.
Group regions (``cargroup``, ``persongroup``, ...) become ignore boxes. Without a json the
``_gtFine_instanceIds.png`` is used: values ``labelId * 1000 + k`` are instances, numbered by increasing
value; values equal to an instance class's label id are group regions, one ignore box per connected
component.

Depth (metres) = baseline * fx / d with d = (p - 1) / 256 from the 16-bit disparity PNG (p <= 1 is
invalid and gives 0) and the camera json. A dataset without a ``disparity/<split>`` and ``camera/<split>``
folder simply has no depth. When those folders exist, a missing or malformed disparity/camera file of
one image is a bad input: lenient mode records a ``Reject`` naming the file and keeps the image without
depth (its boxes are still good; the reject says "...; image kept without depth"); strict mode raises.

Polygons are filled with OpenCV (``cv2.fillPoly``); Cityscapes' own scripts use PIL, so on real data a
json-derived mask can differ from the shipped instanceIds PNG by a pixel along its outline.

Construction parses jsons and PNG headers only (about 2975 jsons for the real train split, with a progress
bar on a terminal); images and disparity are decoded in ``load_image`` / ``load_depth`` (a corrupt image
body therefore surfaces there, as an ``InputError`` naming the file; ``pipeline summary --check-images``
decodes them all).
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from ..errors import InputError
from ..index import IndexRow
from .base import Category, Dataset, Reject, Sample, index_progress
from .images import read_image_rgb, read_json, read_png_channel, validate_box

CITYSCAPES_CATEGORIES: list[Category] = [
    Category(24, "person"), Category(25, "rider"), Category(26, "car"), Category(27, "truck"),
    Category(28, "bus"), Category(31, "train"), Category(32, "motorcycle"), Category(33, "bicycle"),
]
INSTANCE_LABEL_IDS: dict[str, int] = {c.name: c.id for c in CITYSCAPES_CATEGORIES}
GROUP_SUFFIX = "group"

# Label ids of the official Cityscapes label table for the classes the toy generator draws (the 8
# instance classes are above); names not listed are drawn as occluders but never become boxes.
STUFF_LABEL_IDS: dict[str, int] = {
    "unlabeled": 0, "ego vehicle": 1, "rectification border": 2, "out of roi": 3, "static": 4,
    "dynamic": 5, "ground": 6, "road": 7, "sidewalk": 8, "parking": 9, "rail track": 10, "building": 11,
    "wall": 12, "fence": 13, "guard rail": 14, "bridge": 15, "tunnel": 16, "pole": 17, "polegroup": 18,
    "traffic light": 19, "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23,
    "caravan": 29, "trailer": 30,
}

IMAGE_SUFFIX = "_leftImg8bit.png"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def label_id(label: str) -> int:
    """Cityscapes label id of a json label (groups map to their class, as in the instanceIds PNG); 0 if
    the name is unknown."""
    if label in INSTANCE_LABEL_IDS:
        return INSTANCE_LABEL_IDS[label]
    if label.endswith(GROUP_SUFFIX) and label[: -len(GROUP_SUFFIX)] in INSTANCE_LABEL_IDS:
        return INSTANCE_LABEL_IDS[label[: -len(GROUP_SUFFIX)]]
    return STUFF_LABEL_IDS.get(label, 0)


def paint_polygons(canvas: np.ndarray, polygons: list[np.ndarray], values: list[int],
                   offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Fill each (P, 2) int32 x, y polygon with its value, in order (later ones cover earlier ones).

    ``canvas`` is (H, W) of any integer dtype OpenCV draws on (uint8, uint16, int32); ``offset`` (x0, y0)
    is subtracted from the points, to paint a crop of the image. Returns ``canvas``.
    """
    shift = np.array(offset, np.int32)
    for polygon, value in zip(polygons, values):
        cv2.fillPoly(canvas, [(polygon - shift).reshape(-1, 1, 2)], int(value))
    return canvas


def polygon_from_json(value: object, where: str) -> np.ndarray:
    """A json ``polygon`` ([[x, y], ...]) as (P, 2) int32, rounded the way Cityscapes stores it."""
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(where, "polygon is not a list of [x, y] points") from None
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise InputError(where, "polygon is not a list of [x, y] points")
    if not np.isfinite(points).all():
        raise InputError(where, "polygon has a non-finite coordinate")
    return np.rint(points).astype(np.int32)


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from a PNG header, without decoding the image."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise InputError(path, "unreadable image (not a PNG file or truncated header)")
    width, height = struct.unpack(">II", head[16:24])
    if width == 0 or height == 0:
        raise InputError(path, "unreadable image (zero size in PNG header)")
    return int(height), int(width)


def read_camera(path: str | os.PathLike) -> tuple[float, float]:
    """(baseline metres, fx pixels) from a Cityscapes camera json."""
    data = read_json(path)
    try:
        baseline = float(data["extrinsic"]["baseline"])
        fx = float(data["intrinsic"]["fx"])
    except (TypeError, KeyError, ValueError):
        raise InputError(path, "camera json lacks numeric extrinsic.baseline and intrinsic.fx") from None
    if not (baseline > 0 and fx > 0 and math.isfinite(baseline * fx)):
        raise InputError(path, f"camera json has non-positive baseline {baseline:g} or fx {fx:g}")
    return baseline, fx


def disparity_to_depth(disparity: np.ndarray, baseline: float, fx: float) -> np.ndarray:
    """(H, W) uint16 Cityscapes disparity p (d = (p - 1) / 256) -> (H, W) float32 depth metres, 0 where
    p <= 1 (p = 0 marks no measurement; p = 1 is zero disparity, i.e. no finite depth)."""
    p = disparity.astype(np.float64)
    valid = p > 1
    depth = np.zeros(p.shape, np.float32)
    depth[valid] = (baseline * fx * 256.0 / (p[valid] - 1.0)).astype(np.float32)
    return depth


def load_depth(path: str, baseline: float, fx: float, height: int, width: int) -> np.ndarray:
    """Depth of one image from its disparity PNG; ``InputError`` naming the file when it is unusable."""
    disparity = read_png_channel(path, np.uint16)
    if disparity.shape != (height, width):
        raise InputError(path, f"disparity is {disparity.shape[1]}x{disparity.shape[0]}, "
                               f"image is {width}x{height}")
    return disparity_to_depth(disparity, baseline, fx)


def tight_box(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> Optional[np.ndarray]:
    """(4,) float32 x1, y1, x2, y2 of the True pixels of an (H, W) bool mask (x2, y2 exclusive), shifted
    by ``offset`` (x0, y0); None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    x0, y0 = offset
    return np.array([cols[0] + x0, rows[0] + y0, cols[-1] + 1 + x0, rows[-1] + 1 + y0], np.float32)


def group_components(instance_ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Group regions of an (H, W) instanceIds map: (class id, (H, W) bool mask) per 8-connected component
    of the pixels whose value is an instance class's bare label id, by class id then component order."""
    out = []
    for value in sorted(set(np.unique(instance_ids).tolist()) & set(INSTANCE_LABEL_IDS.values())):
        count, labels = cv2.connectedComponents((instance_ids == value).astype(np.uint8), connectivity=8)
        out.extend((value, labels == k) for k in range(1, count))
    return out


def visible_boxes(polygons: list[np.ndarray], targets: list[int], height: int, width: int
                  ) -> list[Optional[np.ndarray]]:
    """Tight (4,) float32 box of the pixels of each ``polygons[t]`` (t in ``targets``) that no later
    polygon covers, in a ``height`` x ``width`` image; None where nothing is visible.

    The polygons are painted on the whole frame, exactly as ``_gt_masks`` paints them (OpenCV clips
    polygons that leave the canvas in a way that can move a pixel, so a crop would not agree), but each
    box is searched only within its polygon's bounds: the cost follows the objects' sizes.
    """
    first = min(targets)
    owner = paint_polygons(np.full((height, width), -1, np.int32), polygons[first:],
                           list(range(first, len(polygons))))
    boxes = []
    for t in targets:
        polygon = polygons[t]
        x0, y0 = max(int(polygon[:, 0].min()), 0), max(int(polygon[:, 1].min()), 0)
        x1, y1 = min(int(polygon[:, 0].max()) + 1, width), min(int(polygon[:, 1].max()) + 1, height)
        boxes.append(tight_box(owner[y0:y1, x0:x1] == t, (x0, y0)) if x1 > x0 and y1 > y0 else None)
    return boxes


@dataclass
class _Annotation:
    """Where an image's masks come from (kept private: only ``_gt_masks`` reads it)."""

    kind: str                          # "json" or "png"
    path: str
    instance_index: dict[int, int]     # instance id -> json object index ("json") or PNG value ("png")
    ignore_index: list[int]            # json object index of each kept group ("json" only)
    painted: list[int]                 # json object indices that can cover an instance, in drawing order


@dataclass
class _Parsed:
    boxes: list[np.ndarray]
    classes: list[int]
    instance_ids: list[int]
    ignore_boxes: list[np.ndarray]
    ignore_classes: list[int]
    annotation: _Annotation


class CityscapesDataset(Dataset):
    """One split of a Cityscapes-layout folder (see the module docstring for the rules)."""

    name = "cityscapes"

    def __init__(self, root: str | os.PathLike, split: str, strict: bool = False, scan: bool = True):
        super().__init__(os.fspath(root), split, strict)
        self.categories = list(CITYSCAPES_CATEGORIES)
        self._annotations: dict[str, _Annotation] = {}
        root_path = Path(self.root)
        image_dir = root_path / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise InputError(image_dir, f"no such folder: not a Cityscapes root with a '{split}' split")
        self.image_paths = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not self.image_paths:
            raise InputError(image_dir, f"no <city>/*{IMAGE_SUFFIX} images")
        self.with_depth = (root_path / "disparity" / split).is_dir() or (root_path / "camera" / split).is_dir()
        if not scan:
            return
        with index_progress(self.image_paths, f"index cityscapes/{split}") as bar:
            for path in bar:
                sample = self._load_sample(root_path, path, self.with_depth)
                if sample is not None:
                    self._samples.append(sample)

    def index_rows(self) -> Iterator[Reject | IndexRow]:
        """The split's images as dataset index rows (``pipeline.index``), one image file at a time, in the order
        the loader reads them, with the loader's rejects as they are found (construct with ``scan=False``)."""
        root = Path(self.root)
        for path in self.image_paths:
            sample = self._load_sample(root, path, self.with_depth)
            self._annotations.clear()       # ground truth: evaluation reads it from the files, not the index
            rejects, self.rejects = self.rejects, []
            yield from rejects
            if sample is None:
                continue
            if sample.has_depth:
                disparity, baseline, fx = self._depth_source(root, path)
                yield IndexRow.from_sample(sample, (Path(disparity).relative_to(root).as_posix(), "disparity",
                                                    (baseline, fx)))
            else:
                yield IndexRow.from_sample(sample)

    def _depth_source(self, root: Path, path: Path) -> tuple[str, float, float]:
        """The image's disparity file and its camera's (baseline, fx); ``InputError`` naming the missing or bad
        file."""
        city, base = path.parent.name, path.name[: -len(IMAGE_SUFFIX)]
        disparity = root / "disparity" / self.split / city / f"{base}_disparity.png"
        camera = root / "camera" / self.split / city / f"{base}_camera.json"
        if not disparity.exists():
            raise InputError(disparity, "disparity file not found")
        if not camera.exists():
            raise InputError(camera, "camera file not found")
        baseline, fx = read_camera(camera)
        return os.fspath(disparity), baseline, fx

    def _load_sample(self, root: Path, path: Path, with_depth: bool) -> Optional[Sample]:
        city = path.parent.name
        base = path.name[: -len(IMAGE_SUFFIX)]
        gt_dir = root / "gtFine" / self.split / city
        try:
            height, width = png_size(path)
            parsed = self._parse_annotations(gt_dir / f"{base}_gtFine_polygons.json",
                                             gt_dir / f"{base}_gtFine_instanceIds.png", height, width)
        except InputError as exc:
            self.record_reject(exc)
            return None
        depth_loader = None
        if with_depth:
            try:
                disparity, baseline, fx = self._depth_source(root, path)
                depth_loader = partial(load_depth, disparity, baseline, fx, height, width)
            except InputError as exc:
                self.record_depth_reject(exc)
        self._annotations[base] = parsed.annotation
        return Sample(
            image_id=base,
            file_name=path.relative_to(root).as_posix(),
            height=height, width=width,
            boxes=np.array(parsed.boxes, np.float32).reshape(-1, 4),
            classes=np.array(parsed.classes, np.int32),
            instance_ids=np.array(parsed.instance_ids, np.int32),
            ignore_boxes=np.array(parsed.ignore_boxes, np.float32).reshape(-1, 4),
            ignore_classes=np.array(parsed.ignore_classes, np.int32),
            has_depth=depth_loader is not None,
            _image_loader=partial(read_image_rgb, os.fspath(path)),
            _depth_loader=depth_loader,
        )

    def _parse_annotations(self, json_path: Path, png_path: Path, height: int, width: int) -> _Parsed:
        if json_path.is_file():
            return self._parse_json(json_path, height, width)
        if png_path.is_file():
            return self._parse_instance_png(png_path, height, width)
        raise InputError(json_path, f"file not found (nor the {png_path.name} fallback)")

    def _parse_json(self, path: Path, height: int, width: int) -> _Parsed:
        where = os.fspath(path)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            raise InputError(where, "malformed polygons json: no 'objects' list")
        size = (data.get("imgHeight"), data.get("imgWidth"))
        if size != (height, width):
            raise InputError(where, f"imgHeight/imgWidth {size[0]}x{size[1]} differ from the image's "
                                    f"{height}x{width}")
        polygons: list[np.ndarray] = []
        indices: list[int] = []                    # json object index of each polygon
        targets: list[tuple[int, str, int]] = []   # (position in polygons, kind, instance id or class)
        instance_count = 0
        for index, obj in enumerate(data["objects"]):
            if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
                raise InputError(where, f"malformed polygons json: object {index} has no 'label'")
            if obj.get("deleted"):
                continue
            label = obj["label"]
            kind = ("instance" if label in INSTANCE_LABEL_IDS
                    else "group" if label.endswith(GROUP_SUFFIX)
                    and label[: -len(GROUP_SUFFIX)] in INSTANCE_LABEL_IDS else "stuff")
            instance_id = instance_count
            instance_count += kind == "instance"
            object_where = f"{where}: object {index} ({label})"
            try:
                polygon = polygon_from_json(obj.get("polygon"), object_where)
                if kind != "stuff":
                    # Polygons may run past the border (the visible part is clipped), but not miss it.
                    validate_box([polygon[:, 0].min(), polygon[:, 1].min(), polygon[:, 0].max(),
                                  polygon[:, 1].max()], width, height, object_where, tolerance=math.inf)
            except InputError as exc:
                self.record_reject(exc)
                continue
            if kind != "stuff":
                targets.append((len(polygons), kind, instance_id if kind == "instance" else label_id(label)))
            polygons.append(polygon)
            indices.append(index)
        parsed = _Parsed([], [], [], [], [], _Annotation("json", where, {}, [], []))
        if not targets:
            return parsed
        # Only polygons from the first instance/group on can cover one.
        parsed.annotation.painted = indices[targets[0][0]:]
        boxes = visible_boxes(polygons, [position for position, _, _ in targets], height, width)
        for (position, kind, value), box in zip(targets, boxes):
            label = data["objects"][indices[position]]["label"]
            if box is None:
                # A valid json can hold a polygon that later ones cover entirely: nothing to label.
                self.rejects.append(Reject(f"{where}: object {indices[position]} ({label})",
                                           "no visible pixels (covered by later polygons)"))
                continue
            if kind == "instance":
                parsed.boxes.append(box)
                parsed.classes.append(INSTANCE_LABEL_IDS[label])
                parsed.instance_ids.append(value)
                parsed.annotation.instance_index[value] = indices[position]
            else:
                parsed.ignore_boxes.append(box)
                parsed.ignore_classes.append(value)
                parsed.annotation.ignore_index.append(indices[position])
        return parsed

    def _parse_instance_png(self, path: Path, height: int, width: int) -> _Parsed:
        where = os.fspath(path)
        ids = read_png_channel(path, np.uint16)
        if ids.shape != (height, width):
            raise InputError(where, f"instanceIds is {ids.shape[1]}x{ids.shape[0]}, image is {width}x{height}")
        parsed = _Parsed([], [], [], [], [], _Annotation("png", where, {}, [], []))
        class_ids = set(INSTANCE_LABEL_IDS.values())
        for value in np.unique(ids).tolist():
            if value >= 1000 and value // 1000 in class_ids:
                instance_id = len(parsed.instance_ids)
                parsed.boxes.append(tight_box(ids == value))
                parsed.classes.append(value // 1000)
                parsed.instance_ids.append(instance_id)
                parsed.annotation.instance_index[instance_id] = value
        for value, component in group_components(ids):
            parsed.ignore_boxes.append(tight_box(component))
            parsed.ignore_classes.append(value)
        return parsed

    @staticmethod
    def _owner_map(annotation: _Annotation, sample: Sample) -> np.ndarray:
        """(H, W) int32 json object index owning each pixel (-1: none), painting the objects that were
        painted when the dataset was built."""
        objects = read_json(annotation.path)["objects"]
        polygons = [polygon_from_json(objects[i]["polygon"], annotation.path) for i in annotation.painted]
        owner = np.full((sample.height, sample.width), -1, np.int32)
        return paint_polygons(owner, polygons, annotation.painted)

    def _gt_masks(self, sample: Sample) -> dict[int, np.ndarray]:
        annotation = self._annotations[sample.image_id]
        if annotation.kind == "png":
            ids = read_png_channel(annotation.path, np.uint16)
            return {int(i): ids == annotation.instance_index[int(i)] for i in sample.instance_ids}
        owner = self._owner_map(annotation, sample)
        return {int(i): owner == annotation.instance_index[int(i)] for i in sample.instance_ids}

    def _gt_ignore_masks(self, sample: Sample) -> list[np.ndarray]:
        annotation = self._annotations[sample.image_id]
        if annotation.kind == "png":
            return [component for _, component in group_components(read_png_channel(annotation.path))]
        owner = self._owner_map(annotation, sample)
        return [owner == index for index in annotation.ignore_index]

