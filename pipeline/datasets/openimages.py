"""OpenImages box annotations (``oidv6-train-annotations-bbox.csv`` style) as dataset index rows.

Input, as the OpenImages download lays it out:

* the boxes CSV, one row per box, with a header naming at least ``ImageID, LabelName, XMin, XMax, YMin, YMax``
  (and usually ``IsGroupOf``; the other columns are not read). Coordinates are fractions of the image's width and
  height;
* the class-descriptions CSV (``class-descriptions-boxable.csv``: ``LabelName,DisplayName`` rows, with or without
  that header). Category ids are the classes' 1-based line numbers in that file, so they stay put as long as the
  file does;
* the images, ``<root>/<ImageID>.jpg`` (``IMAGE_SUFFIX``). Only the file's header is read, for its size.

Rules (each bad item goes to the rejects with its reason, and the rest goes on):

* ``IsGroupOf = 1`` boxes are crowd: ignore regions, never training instances.
* A box's ``instance_id`` is its index among its image's rows in file order (group and rejected rows keep their
  slots, as COCO's annotations do), so fixing or breaking one row never renumbers the others.
* Rejected boxes: not four finite numbers, a zero or negative width or height ("zero-area box"), outside the image
  by more than ``BOX_TOLERANCE`` px (it is clipped within that), or a ``LabelName`` not in the class file.
* Rejected images: no image file, an unreadable image header, an ``ImageID`` that is not a plain file name.
* The segmentation CSV, where a user has one, is for evaluation only and is not read here.

Nothing holds the whole file: the CSV is read in blocks (``pyarrow.csv.open_csv``) and spread over hash buckets on
disk (``pipeline.index.Buckets``), and each bucket is grouped by image in turn.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import InputError
from ..index import Buckets, IndexRow, group_positions
from .base import Category, Reject
from .images import validate_box

IMAGE_SUFFIX = ".jpg"
BOX_TOLERANCE = 1.0                 # px, as COCO's loader
BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_BLOCK_BYTES = 16 << 20             # CSV bytes parsed at a time


def read_classes(path: str | os.PathLike) -> tuple[list[Category], dict[str, int]]:
    """The class-descriptions CSV -> categories (id = 1-based line number, name = DisplayName) and LabelName -> id.
    A missing file, a line without two fields or a LabelName listed twice is a one-line ``InputError``."""
    path = Path(path)
    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=["LabelName", "DisplayName"]),
                               convert_options=pacsv.ConvertOptions(column_types={"LabelName": pa.string(),
                                                                                  "DisplayName": pa.string()}))
    except FileNotFoundError:
        raise InputError(path, "class descriptions file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"not a LabelName,DisplayName CSV ({str(exc).splitlines()[0]})") from None
    names, labels = table.column("DisplayName").to_pylist(), table.column("LabelName").to_pylist()
    if labels and labels[0] == "LabelName":
        names, labels = names[1:], labels[1:]
    categories, ids = [], {}
    for k, (label, name) in enumerate(zip(labels, names), start=1):
        if not label or name is None:
            raise InputError(path, f"line {k}: expected LabelName,DisplayName")
        if label in ids:
            raise InputError(path, f"class {label} is listed twice")
        ids[label] = k
        categories.append(Category(k, name))
    if not categories:
        raise InputError(path, "no classes")
    return categories, ids


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header only; ``InputError`` naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise InputError(path, "image file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(path, f"unreadable image ({exc})") from None
    if width <= 0 or height <= 0:
        raise InputError(path, "unreadable image (zero size in its header)")
    return int(height), int(width)


def _box_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The boxes CSV in blocks, the needed columns only (``IsGroupOf`` as 0 where the file has no such column)."""
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_BLOCK_BYTES),
                                convert_options=pacsv.ConvertOptions(
                                    column_types={"ImageID": pa.string(), "LabelName": pa.string()}))
    except FileNotFoundError:
        raise InputError(path, "boxes file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"not a CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in BOX_COLUMNS if c not in reader.schema.names]
    if missing:
        raise InputError(path, f"not an OpenImages boxes CSV: no column {', '.join(missing)}")
    group = "IsGroupOf" in reader.schema.names
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            raise InputError(path, f"malformed CSV ({str(exc).splitlines()[0]})") from None
        cols = [batch.column(c) for c in BOX_COLUMNS]
        cols = cols[:2] + [pc.cast(c, pa.float64(), safe=False) if c.type != pa.float64() else c for c in cols[2:]]
        flag = (pc.cast(batch.column("IsGroupOf"), pa.int8(), safe=False) if group
                else pa.array(np.zeros(batch.num_rows, np.int8)))
        yield pa.RecordBatch.from_arrays(cols + [flag], names=list(BOX_COLUMNS) + ["IsGroupOf"])


BUCKET_SCHEMA = pa.schema([("ImageID", pa.string()), ("LabelName", pa.string()), ("XMin", pa.float64()),
                           ("XMax", pa.float64()), ("YMin", pa.float64()), ("YMax", pa.float64()),
                           ("IsGroupOf", pa.int8())])


def openimages_index_rows(root: str | os.PathLike, boxes_csv: str | os.PathLike, classes: dict[str, int],
                          scratch: str | os.PathLike, buckets: int = 64, min_box_side: float = 0.0
                          ) -> Iterator[Reject | list[tuple[int, IndexRow]]]:
    """Rejects, and per hash bucket the (position, row) pairs of its images in source order (position = the CSV
    row of the image's first box), of an OpenImages boxes CSV (module docstring). ``classes``: LabelName -> category
    id from `read_classes`; ``scratch``: a folder for the hash buckets (emptied when done)."""
    root, boxes_csv = Path(root), Path(boxes_csv)
    where = os.fspath(boxes_csv)
    spread = Buckets(scratch, BUCKET_SCHEMA, "ImageID", buckets)
    position = 0
    try:
        for batch in _box_batches(boxes_csv):
            seq = np.arange(position, position + batch.num_rows, dtype=np.int64)
            position += batch.num_rows
            ok = pc.invert(pc.is_null(batch.column("ImageID"))).to_numpy(zero_copy_only=False)
            for k in np.flatnonzero(~ok):
                yield Reject(where, f"row {int(seq[k]) + 2}: no ImageID")     # +2: 1-based, after the header
            spread.add(batch.filter(pa.array(ok)), seq[ok])
        spread.finish()
        for b in range(buckets):
            run: list[tuple[int, IndexRow]] = []
            for item in _bucket_rows(spread.bucket(b), root, where, classes, min_box_side):
                if isinstance(item, Reject):
                    yield item
                else:
                    run.append(item)
            yield run
    finally:
        spread.close()


def _bucket_rows(table: pa.Table, root: Path, where: str, classes: dict[str, int], min_box_side: float
                 ) -> Iterator[Reject | tuple[int, IndexRow]]:
    ids = table.column("ImageID").to_pylist()
    seqs = table.column("_seq").to_numpy()
    labels = table.column("LabelName").to_pylist()
    coords = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in ("XMin", "YMin", "XMax", "YMax")],
                      1).astype(np.float64).reshape(-1, 4)
    group = table.column("IsGroupOf").to_numpy(zero_copy_only=False)
    for image_id, rows in group_positions(ids).items():
        if not _SAFE_ID.match(image_id) or image_id in (".", ".."):
            yield Reject(where, f"ImageID {image_id!r} is not a plain file name; its {len(rows)} box(es) are skipped")
            continue
        file_name = image_id + IMAGE_SUFFIX
        try:
            height, width = image_size(root / file_name)
        except InputError as exc:
            yield Reject(exc.where, f"{exc.problem}; its {len(rows)} box(es) are skipped")
            continue
        boxes, cats, inst, ignore, ignore_cats = [], [], [], [], []
        for slot, k in enumerate(rows):
            name = f"row {int(seqs[k]) + 2} (box {slot} of image {image_id})"
            if labels[k] not in classes:
                yield Reject(where, f"{name}: unknown LabelName {labels[k]!r}")
                continue
            x1, y1, x2, y2 = coords[k]
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                yield Reject(where, f"{name}: coordinates are not four finite numbers")
                continue
            if x2 <= x1 or y2 <= y1:
                yield Reject(where, f"{name}: zero-area box (XMin {x1:g}, XMax {x2:g}, YMin {y1:g}, YMax {y2:g})")
                continue
            try:
                box = validate_box([x1 * width, y1 * height, x2 * width, y2 * height], width, height, where,
                                   min_side=min_box_side, tolerance=BOX_TOLERANCE)
            except InputError as exc:
                yield Reject(where, f"{name}: {exc.problem}")
                continue
            if group[k]:
                ignore.append(box)
                ignore_cats.append(classes[labels[k]])
            else:
                boxes.append(box)
                cats.append(classes[labels[k]])
                inst.append(slot)
        yield int(seqs[rows[0]]), IndexRow(
            image_id, file_name, height, width, np.array(boxes, np.float32).reshape(-1, 4), np.array(cats, np.int32),
            np.array(inst, np.int32), np.array(ignore, np.float32).reshape(-1, 4), np.array(ignore_cats, np.int32))
