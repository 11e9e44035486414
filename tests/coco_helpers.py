"""Tiny COCO datasets written into a test's tmp_path: a few small PNGs and an instances json."""
from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def rect_polygon(x1: float, y1: float, x2: float, y2: float) -> list[list[float]]:
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def write_image(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None,
               ann_name: str = "annotations.json", write_images: bool = True) -> Path:
    """Write ``images`` (COCO image entries; their files too unless ``write_images`` is False) and the json."""
    root.mkdir(parents=True, exist_ok=True)
    if write_images:
        for k, img in enumerate(images):
            write_image(root / img["file_name"], img["height"], img["width"], seed=k)
    ann = root / ann_name
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": CATEGORIES if categories is None else categories}))
    return ann


def two_image_coco(root: Path) -> Path:
    """Image 1 (40x60): a person (rectangle polygon), a crowd car, a car (triangle polygon).
    Image 2 (30x50): one person as an uncompressed RLE."""
    images = [{"id": 1, "file_name": "images/a.png", "height": 40, "width": 60},
              {"id": 2, "file_name": "images/b.png", "height": 30, "width": 50}]
    rle = {"size": [30, 50], "counts": [5 * 30 + 3, 10, 20, 10, 30 * 50 - (5 * 30 + 3) - 40]}
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 10.0, 20.0], "iscrowd": 0,
         "segmentation": rect_polygon(2, 3, 12, 23), "area": 200.0},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [30.0, 5.0, 20.0, 10.0], "iscrowd": 1,
         "segmentation": rect_polygon(30, 5, 50, 15), "area": 200.0},
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [20.0, 20.0, 30.0, 15.0], "iscrowd": 0,
         "segmentation": [[20, 20, 50, 20, 20, 35]], "area": 225.0},
        {"id": 20, "image_id": 2, "category_id": 1, "bbox": [5.0, 3.0, 2.0, 10.0], "iscrowd": 0,
         "segmentation": rle, "area": 20.0},
    ]
    return write_coco(root, images, annotations)


class FakeTerminal(io.StringIO):
    """A stderr stand-in that says it is a terminal, to see the progress bars shown only on one."""

    def isatty(self) -> bool:
        return True
