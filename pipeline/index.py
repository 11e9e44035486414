"""The dataset index: one Parquet row per image, written once by streaming, read in parts.

An index is a folder::

    part-00000.parquet ...   rows of ``INDEX_SCHEMA``, ``IndexConfig.part_images`` images per part
    _rejects.jsonl           one line per input that could not be used: {"where", "problem"}
    _index.json              written last: dataset, categories, parts, counts; its presence means "complete"

Each part is written under a temporary name and renamed, and ``_index.json`` only after the last part, so an
interrupted build leaves no index that looks finished (building again starts over). Nothing here holds the
dataset: a builder streams its source through ``IndexWriter``, which keeps one part of rows in memory, and the
sources that are not grouped by image (COCO's json, OpenImages' CSVs) are first spread over hash buckets on disk
(``Buckets``), so only one bucket is grouped in memory at a time.

Boxes are x1, y1, x2, y2 in pixels as in ``pipeline.datasets.base.Sample``; ``instance_ids`` are each box's index
among its image's annotations in the source's order, so ids stay stable when another row is fixed or broken.
Depth, where a dataset has it, is a file, a kind and its parameters: ``depth_kind`` "metres" with ``depth_params``
[scale] (depth = stored value x scale: COCO's ``depth_file`` and ``depth_scale``) or "disparity" with [baseline,
fx] (Cityscapes: depth = baseline x fx / ((p - 1) / 256)).
"""
from __future__ import annotations

import heapq
import json
import os
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from boxmask_common.files import atomic_path, atomic_write_text

from .errors import InputError

INDEX_VERSION = 2
INDEX_META = "_index.json"
INDEX_REJECTS = "_rejects.jsonl"
_BOX = pa.list_(pa.float32(), 4)

INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("file_name", pa.string()),          # relative to the dataset root
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("boxes", pa.list_(_BOX)),           # (N, 4) x1, y1, x2, y2 pixels
    ("classes", pa.list_(pa.int32())),   # (N,) category ids
    ("instance_ids", pa.list_(pa.int32())),
    ("ignore_boxes", pa.list_(_BOX)),    # (M, 4) crowd / group regions
    ("ignore_classes", pa.list_(pa.int32())),
    ("depth_file", pa.string()),         # null: no depth
    ("depth_kind", pa.string()),         # "metres" | "disparity"
    ("depth_params", pa.list_(pa.float64())),
])


@dataclass
class IndexRow:
    """One image of the index (the fields of ``INDEX_SCHEMA``); arrays as in ``Sample``."""

    image_id: str
    file_name: str
    height: int
    width: int
    boxes: np.ndarray
    classes: np.ndarray
    instance_ids: np.ndarray
    ignore_boxes: np.ndarray
    ignore_classes: np.ndarray
    depth_file: str | None = None
    depth_kind: str | None = None
    depth_params: tuple[float, ...] | None = None

    @classmethod
    def from_sample(cls, sample, depth: tuple[str, str, tuple[float, ...]] | None = None) -> "IndexRow":
        """The row of a loader's ``pipeline.datasets.base.Sample``; ``depth``: (file relative to the root, kind,
        params) when the sample has depth."""
        return cls(sample.image_id, sample.file_name, sample.height, sample.width, sample.boxes, sample.classes,
                   sample.instance_ids, sample.ignore_boxes, sample.ignore_classes, *(depth or (None, None, None)))

    @property
    def has_depth(self) -> bool:
        return self.depth_file is not None

    def to_sample(self, root: str | os.PathLike):
        """The ``pipeline.datasets.base.Sample`` of this row, its image and depth read from under ``root`` when
        loaded (as the loaders read them: depth in metres, 0 = invalid)."""
        from .datasets.base import Sample
        from .datasets.cityscapes import load_depth as disparity_depth
        from .datasets.coco import read_depth
        from .datasets.images import read_image_rgb

        root = Path(root)
        depth = None
        if self.depth_file is not None:
            path, params = os.fspath(root / self.depth_file), tuple(self.depth_params or ())
            if self.depth_kind == "disparity":
                depth = partial(disparity_depth, path, *params, self.height, self.width)
            elif self.depth_kind == "metres":
                depth = partial(read_depth, path, *params, self.height, self.width)
            else:
                raise InputError(self.depth_file, f"unknown depth kind {self.depth_kind!r} in the index")
        return Sample(self.image_id, self.file_name, self.height, self.width, self.boxes, self.classes,
                      self.instance_ids, self.ignore_boxes, self.ignore_classes, has_depth=depth is not None,
                      _image_loader=partial(read_image_rgb, os.fspath(root / self.file_name)), _depth_loader=depth)


class IndexWriter:
    """Streams ``IndexRow``s and rejects into an index folder (module docstring): ``add`` / ``reject``, then
    ``close(categories)``. Keeps at most ``part_images`` rows in memory."""

    def __init__(self, out: str | os.PathLike, dataset: str, part_images: int = 10000):
        if part_images < 1:
            raise ValueError(f"part_images must be >= 1, got {part_images}")
        self.out = Path(out)
        self.dataset = dataset
        self.part_images = part_images
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in list(self.out.glob("part-*.parquet")) + list(self.out.glob(".part-*.parquet.tmp")):
            stale.unlink()
        for name in (INDEX_META, INDEX_REJECTS):
            (self.out / name).unlink(missing_ok=True)
        self._rejects = open(self.out / INDEX_REJECTS, "w")
        self._rows: list[IndexRow] = []
        self.parts: list[dict] = []
        self.images = 0
        self.boxes = 0
        self.rejects = 0
        from .datasets.base import Fingerprint  # the datasets package imports this module

        self._fingerprint = Fingerprint()

    @property
    def indexed(self) -> int:
        """Images added so far (written or buffered)."""
        return self.images + len(self._rows)

    def add(self, row: IndexRow) -> None:
        self._fingerprint.add(row)
        self._rows.append(row)
        if len(self._rows) >= self.part_images:
            self._flush()

    def reject(self, where: str | os.PathLike, problem: str) -> None:
        self._rejects.write(json.dumps({"where": os.fspath(where), "problem": problem}) + "\n")
        self.rejects += 1

    def close(self, categories: list[tuple[int, str]], source: dict, kind: str) -> dict:
        """Write the last part and ``_index.json`` (categories as (id, name), ``source`` describes the input:
        its "root" and "split" at least; ``kind`` names the loader, as ``Dataset.name``); returns what
        ``_index.json`` holds. Its "fingerprint" is ``Dataset.fingerprint()`` of the same images."""
        self._flush()
        self._rejects.close()
        meta = {"version": INDEX_VERSION, "dataset": self.dataset, "kind": kind, "source": source,
                "fingerprint": self._fingerprint.digest(kind, source["split"], categories),
                "categories": [[int(i), str(n)] for i, n in categories], "images": self.images,
                "boxes": self.boxes, "rejects": self.rejects, "parts": self.parts}
        atomic_write_text(self.out / INDEX_META, json.dumps(meta, indent=1))
        return meta

    def abort(self) -> None:
        self._rejects.close()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = f"part-{len(self.parts):05d}.parquet"
        with atomic_path(self.out / name) as tmp:
            pq.write_table(rows_to_table(self._rows), tmp, compression="zstd")
        n_boxes = sum(len(r.boxes) for r in self._rows)
        self.parts.append({"file": name, "images": len(self._rows), "boxes": n_boxes})
        self.images += len(self._rows)
        self.boxes += n_boxes
        self._rows = []


def rows_to_table(rows: list[IndexRow]) -> pa.Table:
    """``IndexRow``s -> a table of ``INDEX_SCHEMA``."""
    def lists(key: str, dtype: type, width: int = 0) -> pa.Array:
        """Column ``key`` of every row as one list array: items of ``width`` values (boxes), or scalars (0)."""
        offsets = np.zeros(len(rows) + 1, np.int32)
        offsets[1:] = np.cumsum([len(getattr(r, key)) for r in rows])
        flat = pa.array(np.concatenate([np.asarray(getattr(r, key), dtype).reshape(-1) for r in rows]
                                       or [np.zeros(0, dtype)]))
        return pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(flat, width)
                                        if width else flat)

    def boxes(key: str) -> pa.Array:
        return lists(key, np.float32, 4)

    def ints(key: str) -> pa.Array:
        return lists(key, np.int32)

    return pa.Table.from_arrays([
        pa.array([r.image_id for r in rows], pa.string()),
        pa.array([r.file_name for r in rows], pa.string()),
        pa.array([r.height for r in rows], pa.int32()),
        pa.array([r.width for r in rows], pa.int32()),
        boxes("boxes"), ints("classes"), ints("instance_ids"), boxes("ignore_boxes"), ints("ignore_classes"),
        pa.array([r.depth_file for r in rows], pa.string()),
        pa.array([r.depth_kind for r in rows], pa.string()),
        pa.array([None if r.depth_params is None else list(r.depth_params) for r in rows], pa.list_(pa.float64())),
    ], schema=INDEX_SCHEMA)


def table_rows(table: pa.Table) -> Iterator[IndexRow]:
    """The rows of an index table (one part, or a slice of one) as ``IndexRow``s."""
    cols = {name: table.column(name).combine_chunks() for name in INDEX_SCHEMA.names}

    def boxes(name: str, k: int) -> np.ndarray:
        values = cols[name][k].values
        return np.asarray(values.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, 4)

    def ints(name: str, k: int) -> np.ndarray:
        return np.asarray(cols[name][k].values.to_numpy(zero_copy_only=False), np.int32)

    scalars = {name: cols[name].to_pylist() for name in ("image_id", "file_name", "height", "width", "depth_file",
                                                          "depth_kind", "depth_params")}
    for k in range(table.num_rows):
        yield IndexRow(scalars["image_id"][k], scalars["file_name"][k], scalars["height"][k], scalars["width"][k],
                       boxes("boxes", k), ints("classes", k), ints("instance_ids", k), boxes("ignore_boxes", k),
                       ints("ignore_classes", k), scalars["depth_file"][k], scalars["depth_kind"][k],
                       None if scalars["depth_params"][k] is None else tuple(scalars["depth_params"][k]))


def read_meta(index: str | os.PathLike) -> dict:
    """``_index.json`` of a complete index; a one-line ``InputError`` when the folder holds none."""
    path = Path(index) / INDEX_META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no dataset index here (or its build did not finish): run 'pipeline index'") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable index metadata ({exc})") from None
    if meta.get("version") != INDEX_VERSION:
        raise InputError(path, f"index version {meta.get('version')!r}, this pipeline reads {INDEX_VERSION}")
    return meta


def iter_index(index: str | os.PathLike, batch_images: int = 1024) -> Iterator[IndexRow]:
    """Every row of a complete index, part after part, ``batch_images`` rows decoded at a time."""
    root = Path(index)
    for part in read_meta(root)["parts"]:
        with pq.ParquetFile(root / part["file"]) as f:
            for batch in f.iter_batches(batch_size=batch_images):
                yield from table_rows(pa.Table.from_batches([batch]))


class IndexSource:
    """A complete index opened for labeling: what ``LabelService`` needs of a dataset without its samples.
    ``name`` (the dataset, as configured), ``kind`` (the loader), ``split``, ``root``, ``categories`` (a list of
    ``Category``), ``images``, ``parts`` (paths of the part files, in order), ``fingerprint()`` (the loader's
    ``Dataset.fingerprint()`` of the same images, computed when the index was built) and ``rejects`` (the
    index's rejects as ``Reject``s, read when asked)."""

    def __init__(self, index: str | os.PathLike):
        from .datasets.base import Category

        self.path = Path(index)
        self.meta = read_meta(self.path)
        source = self.meta.get("source") or {}
        self.name = self.meta["dataset"]
        self.kind = self.meta.get("kind", self.name)
        self.split = source.get("split", "")
        self.root = source.get("root", "")
        self.categories = [Category(int(i), str(n)) for i, n in self.meta["categories"]]
        self.images = int(self.meta["images"])
        self.parts = [self.path / p["file"] for p in self.meta["parts"]]

    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def rejects(self) -> list:
        from .datasets.base import Reject

        path = self.path / INDEX_REJECTS
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out.append(Reject(rec["where"], rec["problem"]))
        return out

    def image_ids(self, limit: int | None = None, batch_images: int = 65536) -> Iterator[pa.Array]:
        """The image ids of the first ``limit`` images (all: None), a string array per read batch (the driver
        counts finished images without holding every id)."""
        left = self.images if limit is None else min(limit, self.images)
        for part in self.parts:
            if left <= 0:
                return
            with pq.ParquetFile(part) as f:
                for batch in f.iter_batches(batch_size=batch_images, columns=["image_id"]):
                    ids = batch.column(0)[:left]
                    left -= len(ids)
                    yield ids
                    if left <= 0:
                        return


class Buckets:
    """Rows of a source that is not grouped by image, spread over ``count`` Arrow files on disk by a hash of
    their image id, so that one bucket at a time can be grouped in memory. Each row keeps its source position
    (column ``_seq``), so a bucket sorts back into source order. ``add(batch, seq)`` with a string column ``key``;
    ``bucket(b)`` (after ``finish()``) is bucket b's table in source order; ``close()`` removes the files."""

    def __init__(self, folder: str | os.PathLike, schema: pa.Schema, key: str, count: int = 64):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.count = count
        self.schema = schema.append(pa.field("_seq", pa.int64()))
        self._writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}

    def add(self, batch: pa.Table | pa.RecordBatch, seq: np.ndarray) -> None:
        """Spread ``batch``; ``seq`` (int64, one per row) are the rows' positions in the source."""
        keys = batch.column(self.key).to_pylist()
        bucket = np.fromiter((bucket_of(k, self.count) for k in keys), np.int64, len(keys))
        arrays = [batch.column(name) for name in self.schema.names[:-1]] + [pa.array(seq, pa.int64())]
        full = pa.Table.from_arrays(arrays, schema=self.schema)
        order = np.argsort(bucket, kind="stable")
        full = full.take(pa.array(order))
        starts = np.searchsorted(bucket[order], np.arange(self.count + 1))
        for b in np.flatnonzero(np.diff(starts)):
            lo, hi = int(starts[b]), int(starts[b + 1])
            self._writer(int(b)).write_table(full.slice(lo, hi - lo))

    def finish(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def bucket(self, b: int) -> pa.Table:
        path = self._path(b)
        if not path.exists():
            return self.schema.empty_table()
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        return table.sort_by("_seq")

    def close(self) -> None:
        for w in self._writers.values():
            try:
                w.close()
            except (OSError, pa.ArrowInvalid):
                pass
        self._writers.clear()
        for b in range(self.count):
            self._path(b).unlink(missing_ok=True)

    def _path(self, b: int) -> Path:
        return self.folder / f"{self.key}-{b:04d}.arrow"

    def _writer(self, b: int) -> pa.ipc.RecordBatchFileWriter:
        if b not in self._writers:
            self._writers[b] = pa.ipc.new_file(str(self._path(b)), self.schema)
        return self._writers[b]


class SortedRuns:
    """Index rows produced bucket by bucket, put back into source order: ``add_run(pairs)`` writes one bucket's
    (position, row) pairs, ascending, to a Parquet file in ``folder``; ``merged()`` yields every row in position
    order by a k-way merge that reads each run in small batches (so memory holds one batch per run)."""

    def __init__(self, folder: str | os.PathLike, batch_images: int = 256):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.batch_images = batch_images
        self.runs: list[Path] = []

    def add_run(self, pairs: Iterable[tuple[int, IndexRow]]) -> None:
        path = self.folder / f"run-{len(self.runs):05d}.parquet"
        schema = INDEX_SCHEMA.append(pa.field("_seq", pa.int64()))
        writer = None
        rows: list[IndexRow] = []
        seqs: list[int] = []

        def flush() -> None:
            nonlocal writer, rows, seqs
            if not rows:
                return
            table = rows_to_table(rows).append_column("_seq", pa.array(seqs, pa.int64()))
            if writer is None:
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(table)
            rows, seqs = [], []

        for seq, row in pairs:
            rows.append(row)
            seqs.append(seq)
            if len(rows) >= self.batch_images:
                flush()
        flush()
        if writer is not None:
            writer.close()
            self.runs.append(path)

    def merged(self) -> Iterator[IndexRow]:
        def run(path: Path) -> Iterator[tuple[int, IndexRow]]:
            with pq.ParquetFile(path) as f:
                for batch in f.iter_batches(batch_size=self.batch_images):
                    table = pa.Table.from_batches([batch])
                    yield from zip(table.column("_seq").to_pylist(), table_rows(table.drop_columns(["_seq"])))
        for _, row in heapq.merge(*(run(p) for p in self.runs), key=lambda t: t[0]):   # positions are unique
            yield row

    def close(self) -> None:
        for path in self.runs:
            path.unlink(missing_ok=True)
        self.runs = []


def bucket_of(key: str, count: int) -> int:
    """The bucket (0 .. count-1) of an image id: crc32 of its UTF-8 bytes, stable across runs and machines."""
    return zlib.crc32(str(key).encode()) % count


def group_positions(keys: Iterable[str]) -> dict[str, list[int]]:
    """Positions of each key in ``keys``, keys in first-seen order (one bucket's rows at a time)."""
    groups: dict[str, list[int]] = {}
    for k, key in enumerate(keys):
        groups.setdefault(key, []).append(k)
    return groups
