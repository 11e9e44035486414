"""Test helpers for the label service: a small on-disk dataset and a simple labeler.

``FolderDataset`` reads ``index.json`` + PNG images written by ``write_folder_dataset`` (so corrupt and
missing files are real files); ``BoxLabeler`` labels each box with the pixels it covers and matches it
to the previous object of its class, which exercises every shard column without the structured teacher,
and can fail, hang or kill its process on chosen images. Samples (their image loaders are lambdas) and
labelers are picklable by value (``ray.cloudpickle.register_pickle_by_value``) so Ray workers can use them.
"""
from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipeline.datasets.base import Category, Dataset, Sample, box_to_mask
from pipeline.datasets.images import read_image_rgb
from pipeline.shards import decode_rle, read_manifest

CATEGORIES = [Category(24, "person"), Category(26, "car")]


def write_folder_dataset(root: Path, n: int = 8, size: tuple[int, int] = (48, 64), corrupt: tuple = (),
                         missing: tuple = (), seed: int = 0, sparse_ids: bool = False) -> Path:
    """Images ``img-XXX.png`` with 0-3 random boxes each (image 0 has none); indices in ``corrupt`` get a
    garbage file, those in ``missing`` no file. ``sparse_ids``: the boxes' instance ids are 10, 13, 16, ...
    (as if other annotations had been skipped) instead of their positions 0, 1, 2. Returns ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    h, w = size
    items = []
    for i in range(n):
        name = f"img-{i:03d}.png"
        boxes = []
        for _ in range(0 if i == 0 else int(rng.integers(1, 4))):
            x1, y1 = float(rng.integers(0, w // 2)), float(rng.integers(0, h // 2))
            boxes.append([x1, y1, x1 + float(rng.integers(4, w // 2)), y1 + float(rng.integers(4, h // 2))])
        classes = [int(rng.choice([24, 26])) for _ in boxes]
        items.append({"image_id": f"im{i:03d}", "file_name": name, "height": h, "width": w,
                      "boxes": boxes, "classes": classes,
                      "instance_ids": [10 + 3 * k if sparse_ids else k for k in range(len(boxes))]})
        if i in missing:
            continue
        if i in corrupt:
            (root / name).write_bytes(b"not a png")
            continue
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / name), image)
    # One annotation the dataset itself rejects, as a real loader would.
    items.append({"image_id": "bad", "file_name": "bad.png", "height": h, "width": w,
                  "boxes": [[5, 5, 2, 2]], "classes": [24]})
    (root / "index.json").write_text(json.dumps(items))
    return root


class FolderDataset(Dataset):
    name = "folder"

    def __init__(self, root: str, split: str = "train", strict: bool = False):
        super().__init__(root, split, strict)
        self.categories = list(CATEGORIES)
        for item in json.loads((Path(root) / "index.json").read_text()):
            boxes = np.asarray(item["boxes"], np.float32).reshape(-1, 4)
            if len(boxes) and np.any(boxes[:, 2] <= boxes[:, 0]):
                self.rejects.append(self._reject(item))
                continue
            path = Path(root) / item["file_name"]
            self._samples.append(Sample(
                image_id=item["image_id"], file_name=item["file_name"], height=item["height"],
                width=item["width"], boxes=boxes, classes=np.asarray(item["classes"], np.int32),
                instance_ids=np.asarray(item.get("instance_ids", range(len(boxes))), np.int32),
                _image_loader=lambda p=path: read_image_rgb(p)))

    @staticmethod
    def _reject(item):
        from pipeline.datasets.base import Reject

        return Reject(item["file_name"], "box has x2 <= x1")


@dataclass
class Match:
    partner_image_id: str
    partner_instance_id: int
    grid: int
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray


@dataclass
class Label:
    mask: np.ndarray
    score: float
    correspondences: list


class Bank:
    def __init__(self):
        self.last: dict[int, tuple[str, int]] = {}

    def fill(self) -> dict[int, int]:
        return {c: 1 for c in self.last}

    def image_ids(self) -> set[str]:
        return {image_id for image_id, _ in self.last.values()}


class BoxLabeler:
    """Box-as-mask labeler; ``delay`` seconds per image make runs long enough to interrupt; images in
    ``fail_on`` raise, as a teacher bug would; images in ``die_on`` end the worker process; an image in
    ``hang_on`` sleeps ``hang_s`` seconds, only in the first labeler that reaches it when ``once_dir`` is
    given (a flag file there, shared by the worker processes), else every time."""

    def __init__(self, delay: float = 0.0, fail_on: tuple = (), die_on: tuple = (), hang_on: tuple = (),
                 hang_s: float = 0.0, once_dir: str = ""):
        self.delay = delay
        self.fail_on = fail_on
        self.die_on = die_on
        self.hang_on = hang_on
        self.hang_s = hang_s
        self.once_dir = once_dir
        self.bank = Bank()

    def _first_time(self, image_id: str) -> bool:
        if not self.once_dir:
            return True
        try:
            os.close(os.open(Path(self.once_dir) / f"{image_id}.hung", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def label(self, image, boxes, classes, depth=None, image_id=None):
        time.sleep(self.delay)
        if image_id in self.fail_on:
            raise FloatingPointError(f"teacher diverged on {image_id}\nsecond line")
        if image_id in self.die_on:
            os._exit(3)
        if image_id in self.hang_on and self._first_time(image_id):
            time.sleep(self.hang_s)
        h, w = image.shape[:2]
        out = []
        for k, (box, cls) in enumerate(zip(boxes, classes)):
            matches = []
            partner = self.bank.last.get(int(cls))
            if partner is not None:
                cells = np.arange(3, dtype=np.int32)
                matches.append(Match(partner[0], partner[1], 7, cells, cells[::-1].copy(),
                                     np.full(3, 0.5, np.float32)))
            out.append(Label(box_to_mask(box, h, w), 0.75, matches))
            self.bank.last[int(cls)] = (image_id, k)
        return out


@dataclass
class BoxLabelerFactory:
    delay: float = 0.0
    fail_on: tuple = ()
    die_on: tuple = ()
    hang_on: tuple = ()
    hang_s: float = 0.0
    once_dir: str = ""

    def __call__(self, device: str) -> BoxLabeler:
        return BoxLabeler(self.delay, self.fail_on, self.die_on, self.hang_on, self.hang_s, self.once_dir)


def write_index(dataset: Dataset, out: Path, part_images: int = 5) -> Path:
    """The dataset index (``pipeline.index``) of a dataset in memory, ``part_images`` images per part (several
    parts, so runs cross part boundaries); its rejects are the dataset's. Returns ``out``."""
    from pipeline.index import IndexRow, IndexWriter

    writer = IndexWriter(out, dataset.name, part_images)
    for sample in dataset:
        writer.add(IndexRow.from_sample(sample))
    for rej in dataset.rejects:
        writer.reject(rej.where, rej.problem)
    writer.close([(c.id, c.name) for c in dataset.categories], {"root": str(dataset.root), "split": dataset.split},
                 dataset.name)
    return out


def all_rows(out) -> list[dict]:
    """Every row of a shard directory's part files, as plain dicts."""
    return [r for p in sorted(Path(out).glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def assert_exactly_once(out, dataset, rejected=()):
    """Every image of ``dataset`` except ``rejected`` is in exactly one manifest entry, and its rows are
    exactly its boxes, each once, with the box mask the labeler drew."""
    manifest = read_manifest(out)
    listed = collections.Counter(i for s in manifest["shards"] for i in s["image_ids"])
    assert all(c == 1 for c in listed.values()), listed
    expected = {s.image_id for s in dataset} - set(rejected)
    assert set(listed) == expected
    rows = all_rows(out)
    keys = collections.Counter((r["image_id"], r["instance_id"]) for r in rows)
    assert all(c == 1 for c in keys.values())
    want = {(s.image_id, int(k)) for s in dataset if s.image_id in expected for k in s.instance_ids}
    assert set(keys) == want
    by_id = {s.image_id: s for s in dataset}
    for r in rows:
        s = by_id[r["image_id"]]
        mask = decode_rle(r["mask_rle"], r["height"], r["width"])
        k = list(s.instance_ids).index(r["instance_id"])
        np.testing.assert_array_equal(mask, box_to_mask(s.boxes[k], s.height, s.width))
    assert sum(s["rows"] for s in manifest["shards"]) == len(rows)


def scrape_metrics(names: set[str], done, timeout: float = 20.0) -> dict[str, list[str]]:
    """Sample lines of the node's Prometheus endpoint for each metric in ``names``, scraped until
    ``done(found)`` holds (workers push on an interval) or ``timeout`` seconds pass."""
    import urllib.request

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        found = {n: [ln for ln in text.splitlines() if ln.startswith(f"ray_{n}")] for n in names}
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def metric_sum(lines: list[str]) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)
