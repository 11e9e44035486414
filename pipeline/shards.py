"""Pseudo-label shards: the Parquet contract between labeling, training and users (DESIGN.md section 6).

One row per instance. Column names and types are a public contract; ``pyarrow.parquet`` reads the files
with no project code:

=================  ==============================================================================
column             type and meaning
=================  ==============================================================================
image_id           string: dataset image id
file_name          string: image path relative to the dataset root
height, width      int32: image size
instance_id        int32: index of the box within the image's annotations
category_id        int32: dataset class id
category           string: class name
box                fixed_size_list<float32>[4] (Arrow ``pa.list_(pa.float32(), 4)``, the list of 4 values
                   DESIGN.md names; Parquet stores it as a list): x1, y1, x2, y2 in pixels
mask_rle           string: COCO compressed RLE ``counts`` of the full-image mask (size = height, width)
score              float32: teacher confidence in [0, 1]
round              int32: round that produced the row
teacher            string: short sha256 of the checkpoint file, or "box-prior"
correspondences    list<struct<partner_image_id: string, partner_instance_id: int32, grid: int32,
                   src: list<int32>, dst: list<int32>, weight: list<float32>>>: one struct per bank
                   partner; ``src[k]`` (a cell of this instance's g x g RoI grid, row-major y * g + x)
                   matches ``dst[k]`` (a cell of the partner's grid) with confidence ``weight[k]``.
=================  ==============================================================================

Schema metadata (bytes keys ``boxmask.*``): ``schema_version``, ``classes`` (json list of {id, name}),
``config_digest``, ``dataset``, ``split``, ``data_root``, ``teacher``, ``round``.

A shard directory holds ``part-NNNNN.parquet`` files, ``_manifest.json`` (with its journal ``_manifest.jsonl``
while a run writes) and ``_rejects.jsonl``:

- A shard file is written under a temporary name, fsynced and renamed; only then is its entry appended to the
  manifest's journal (a line, fsynced), which the writer folds into ``_manifest.json`` (replaced atomically) when
  the journal is as long as the manifest and when the run ends; ``boxmask_common.manifest`` reads the two as one.
  So a commit costs one shard, not every image finished so far. A file that is not in the manifest is not
  finished: resuming deletes it and labels its images again. So every finished image is in exactly one
  manifest entry.
- The manifest lists, per shard, its ``file``, ``rows``, ``sha256``, the ``image_ids`` it finishes
  (images without instances included) and ``empty_images`` (id, file name and size of those images,
  so exports can list them).
- ``_rejects.jsonl`` has one json object per input that could not be labeled: ``image_id`` (null for
  dataset-level rejects), ``file``, ``reason`` and ``stage`` ("dataset", "load" or "label"). Images
  rejected at the "load" or "label" stage count as finished on resume, unless the writer is opened with
  ``retry_rejects`` (``pipeline label --retry-rejects``): then their lines leave the file (rewritten
  atomically) and a new failure is recorded again. Dataset-level rejects are always kept.
- Resuming with a different config digest (dataset, split, teacher config or checkpoint) is an error
  unless the caller asks to overwrite, which deletes the shards, manifest and rejects first.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Container, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from boxmask_common.files import atomic_path, atomic_write_bytes, fsync_dir
from boxmask_common.manifest import JOURNAL, MANIFEST, read_manifest

from .errors import UserError, one_line

SCHEMA_VERSION = "1"
REJECTS = "_rejects.jsonl"
LOCK = ".lock"
FOLD_MIN_ENTRIES = 64                 # journal lines before the writer folds them into the manifest
SHARD_PATTERN = re.compile(r"^part-(\d{5,})\.parquet$")
BOX_PRIOR = "box-prior"

log = logging.getLogger(__name__)

CORRESPONDENCE_TYPE = pa.struct([
    ("partner_image_id", pa.string()),
    ("partner_instance_id", pa.int32()),
    ("grid", pa.int32()),
    ("src", pa.list_(pa.int32())),
    ("dst", pa.list_(pa.int32())),
    ("weight", pa.list_(pa.float32())),
])

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("file_name", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("instance_id", pa.int32()),
    ("category_id", pa.int32()),
    ("category", pa.string()),
    ("box", pa.list_(pa.float32(), 4)),
    ("mask_rle", pa.string()),
    ("score", pa.float32()),
    ("round", pa.int32()),
    ("teacher", pa.string()),
    ("correspondences", pa.list_(CORRESPONDENCE_TYPE)),
])


# ----------------------------------------------------------------------------------------------- RLE

def encode_rle(mask: np.ndarray) -> str:
    """COCO compressed RLE ``counts`` of a (H, W) bool mask, as an ASCII string."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle: expected a (H, W) mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return rle["counts"].decode("ascii")


def decode_rle(counts: str, height: int, width: int) -> np.ndarray:
    """Inverse of ``encode_rle``: (height, width) bool."""
    rle = {"size": [int(height), int(width)], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def rle_area(counts: str, height: int, width: int) -> int:
    """Foreground pixel count of an encoded mask, without decoding it."""
    return int(mask_utils.area({"size": [int(height), int(width)], "counts": counts.encode("ascii")}))


# -------------------------------------------------------------------------------------------- rows

def correspondence_records(matches: Iterable) -> list[dict]:
    """Teacher ``Match`` objects (partner_image_id, partner_instance_id, grid, src, dst, weight) as
    plain dicts of the ``correspondences`` struct."""
    out = []
    for m in matches:
        src = np.asarray(m.src, np.int32).reshape(-1)
        dst = np.asarray(m.dst, np.int32).reshape(-1)
        weight = np.asarray(m.weight, np.float32).reshape(-1)
        if not (len(src) == len(dst) == len(weight)):
            raise ValueError(f"correspondence with {m.partner_image_id}: src, dst and weight differ in length "
                             f"({len(src)}, {len(dst)}, {len(weight)})")
        out.append({"partner_image_id": str(m.partner_image_id),
                    "partner_instance_id": int(m.partner_instance_id), "grid": int(m.grid),
                    "src": src.tolist(), "dst": dst.tolist(), "weight": weight.tolist()})
    return out


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    """Row dicts (one per instance, keys = ``SCHEMA`` names) -> a table with exactly ``SCHEMA``."""
    columns = {name: [r[name] for r in rows] for name in SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


# ------------------------------------------------------------------------------------------ metadata

@dataclass
class ShardMeta:
    """What every shard of a directory shares; stored in each file's schema metadata and the manifest."""

    dataset: str
    split: str
    data_root: str
    classes: list[dict]               # [{"id": int, "name": str}, ...]
    config_digest: str
    teacher: str
    round: int
    schema_version: str = SCHEMA_VERSION

    def schema(self) -> pa.Schema:
        meta = {
            "schema_version": self.schema_version,
            "classes": json.dumps(self.classes),
            "config_digest": self.config_digest,
            "dataset": self.dataset,
            "split": self.split,
            "data_root": self.data_root,
            "teacher": self.teacher,
            "round": str(self.round),
        }
        return SCHEMA.with_metadata({f"boxmask.{k}".encode(): v.encode() for k, v in meta.items()})

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> "ShardMeta":
        raw = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        get = lambda key: raw.get(f"boxmask.{key}", "")  # noqa: E731
        return cls(dataset=get("dataset"), split=get("split"), data_root=get("data_root"),
                   classes=json.loads(get("classes") or "[]"), config_digest=get("config_digest"),
                   teacher=get("teacher"), round=int(get("round") or 0),
                   schema_version=get("schema_version"))


@dataclass
class ShardEntry:
    file: str
    rows: int
    sha256: str
    image_ids: list[str]
    empty_images: list[dict] = field(default_factory=list)  # {"image_id", "file_name", "height", "width"}


# ------------------------------------------------------------------------------------------ file I/O

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _sigint_deferred():
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise it: a KeyboardInterrupt in the middle of a
    shard commit would leave the writer's memory behind its manifest, and the exit handler's second flush
    would then list the same images in two shards. Only the main thread may install handlers; elsewhere the
    block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def read_rejects(out_dir: str | os.PathLike) -> list[dict]:
    """Records of ``_rejects.jsonl`` (a torn last line from an interrupted write is ignored)."""
    path = Path(out_dir) / REJECTS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_shard(path: str | os.PathLike, columns: Optional[list[str]] = None,
               filters: Optional[list] = None) -> pa.Table:
    """One shard file as a table; ``UserError`` naming the file when it is not readable Parquet."""
    try:
        return pq.read_table(path, columns=columns, filters=filters)
    except FileNotFoundError:
        raise UserError(path, "shard file not found") from None
    except (OSError, pa.ArrowException) as exc:
        raise UserError(path, f"unreadable shard ({one_line(exc)})") from None


def shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    """Finished shard files, in manifest order."""
    manifest = read_manifest(out_dir)
    return [Path(out_dir) / s["file"] for s in manifest["shards"]]


def iter_shard_tables(out_dir: str | os.PathLike, columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
    """Finished shards one at a time (memory stays at one shard)."""
    for path in shard_paths(out_dir):
        yield read_shard(path, columns=columns)


# ---------------------------------------------------------------------------------------------- writer

def check_resumable(out_dir: str | os.PathLike, meta: ShardMeta) -> Optional[dict]:
    """The manifest of ``out_dir`` (None when there is none) if a run with ``meta`` may add to it;
    ``UserError`` when the directory holds shards of another schema version or config."""
    if not (Path(out_dir) / MANIFEST).exists():
        return None
    manifest = read_manifest(out_dir)
    old = manifest["meta"]
    if old.get("schema_version") != SCHEMA_VERSION:
        raise UserError(out_dir, f"holds shards of schema version {old.get('schema_version')!r}, this code "
                                 f"writes {SCHEMA_VERSION!r}: use another --out, or --overwrite")
    if (old.get("config_digest"), old.get("dataset"), old.get("split")) != (
            meta.config_digest, meta.dataset, meta.split):
        raise UserError(
            out_dir,
            f"holds shards of another config (dataset {old.get('dataset')}, split {old.get('split')}, "
            f"teacher {old.get('teacher')}, digest {old.get('config_digest')}); this run has dataset "
            f"{meta.dataset}, split {meta.split}, teacher {meta.teacher}, digest {meta.config_digest}: "
            f"use another --out, or --overwrite to delete them and start over")
    return manifest


class ShardWriter:
    """Writes one shard directory: resumes from its manifest, buffers finished images until ``shard_rows``
    rows, writes each shard atomically, records rejects.

    Use as a context manager; it holds an exclusive lock on the directory so two runs cannot interleave.
    ``done`` is the set of image ids already finished (in a manifest entry or rejected while loading or
    labeling), which the caller skips.

    ``retry_rejects``: True, or a collection of image ids: the "load" / "label" rejects of those images
    (all of them for True) are dropped on open, so the images are not finished and may be labeled again.
    ``retried`` lists the image ids whose reject lines were dropped.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: ShardMeta, shard_rows: int = 2000,
                 overwrite: bool = False, retry_rejects: bool | Container[str] = False):
        if shard_rows < 1:
            raise UserError("label.shard_rows", f"must be at least 1, got {shard_rows}")
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.shard_rows = shard_rows
        self.overwrite = overwrite
        self.retry_rejects = retry_rejects
        self.retried: list[str] = []          # image ids whose earlier load / label rejects were dropped
        self.entries: list[ShardEntry] = []
        self.done: set[str] = set()
        self.removed: list[str] = []          # unfinished files deleted on open (for the log)
        self._reject_keys: set[tuple] = set()
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_ids: list[str] = []
        self._pending_empty: list[dict] = []
        self._pending_set: set[str] = set()
        self._lock_fd: Optional[int] = None
        self._rejects_file = None
        self._journal_file = None
        self._journal_entries = 0             # entries in the journal, not yet folded into the manifest
        self.rows_written = 0

    # -- lifecycle
    def __enter__(self) -> "ShardWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
                self._fold()
            else:
                # Ctrl-C or an error elsewhere: the buffered images are complete, keep them.
                try:
                    self.flush()
                    self._fold()
                except Exception as flush_exc:  # the original error matters more; a re-run redoes them
                    log.warning("%s: could not write the last shard (%s)", self.out_dir, flush_exc)
        finally:
            self.close()

    def open(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(self.out_dir, f"cannot create output directory ({exc.strerror})") from None
        self._lock_fd = os.open(self.out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise UserError(self.out_dir, "another label run is writing to this directory") from None
        try:
            if self.overwrite:
                self._clear()
            if (self.out_dir / MANIFEST).exists():
                self._resume()
            self._remove_unfinished()
            self._load_rejects()
            self._fold()
            self._rejects_file = open(self.out_dir / REJECTS, "a")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for name in ("_rejects_file", "_journal_file"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clear(self) -> None:
        for path in self.out_dir.iterdir():
            if SHARD_PATTERN.match(path.name) or path.name in (MANIFEST, JOURNAL, REJECTS) or (
                    path.name.startswith(".") and path.name.endswith(".tmp")):
                path.unlink()

    def _resume(self) -> None:
        manifest = check_resumable(self.out_dir, self.meta)
        for raw in manifest["shards"]:
            entry = ShardEntry(**raw)
            path = self.out_dir / entry.file
            if not path.exists():
                raise UserError(path, "listed in the manifest but missing; restore it or use --overwrite")
            if sha256_file(path) != entry.sha256:
                raise UserError(path, "sha256 differs from the manifest (file changed or corrupt); "
                                      "restore it or use --overwrite")
            self.entries.append(entry)
            self.done.update(entry.image_ids)
            self.rows_written += entry.rows

    def _remove_unfinished(self) -> None:
        listed = {e.file for e in self.entries}
        for path in sorted(self.out_dir.iterdir()):
            unfinished_shard = SHARD_PATTERN.match(path.name) and path.name not in listed
            temporary = path.name.startswith(".") and path.name.endswith(".tmp")
            if unfinished_shard or temporary:
                path.unlink()
                self.removed.append(path.name)

    def _load_rejects(self) -> None:
        path = self.out_dir / REJECTS
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A write torn by a kill: drop the partial line so the file stays valid jsonl.
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        records = read_rejects(self.out_dir)
        if self.retry_rejects is not False:
            keep = [r for r in records if not self._retried(r)]
            if len(keep) < len(records):
                self.retried = sorted({r["image_id"] for r in records if self._retried(r)})
                atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
                records = keep
        for rec in records:
            self._reject_keys.add((rec.get("stage"), rec.get("image_id"), rec.get("file"), rec.get("reason")))
            if rec.get("image_id") is not None and rec.get("stage") in ("load", "label"):
                self.done.add(rec["image_id"])

    def _retried(self, rec: dict) -> bool:
        """Whether ``retry_rejects`` drops this reject record."""
        image_id = rec.get("image_id")
        if image_id is None or rec.get("stage") not in ("load", "label"):
            return False
        return self.retry_rejects is True or image_id in self.retry_rejects

    # -- writing
    def reject(self, image_id: Optional[str], file: str, reason: str, stage: str) -> None:
        """Record an input that could not be labeled (idempotent: the same record is written once)."""
        key = (stage, image_id, file, reason)
        if key in self._reject_keys:
            return
        self._reject_keys.add(key)
        line = json.dumps({"image_id": image_id, "file": file, "reason": reason, "stage": stage})
        self._rejects_file.write(line + "\n")
        self._rejects_file.flush()
        os.fsync(self._rejects_file.fileno())
        if image_id is not None and stage in ("load", "label"):
            self.done.add(image_id)

    def add(self, image_id: str, table: pa.Table, empty: Optional[dict] = None) -> bool:
        """Buffer the rows of one finished image (``empty`` describes an image without instances).

        Returns False, and adds nothing, when the image is already finished or buffered, which keeps a
        result that arrives twice (a retried batch) from being written twice. Writes a shard when the
        buffer reaches ``shard_rows`` rows.
        """
        if image_id in self.done or image_id in self._pending_set:
            return False
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
        elif empty is not None:
            self._pending_empty.append(empty)
        self._pending_ids.append(image_id)
        self._pending_set.add(image_id)
        if self._pending_rows >= self.shard_rows:
            self.flush()
        return True

    def flush(self) -> Optional[ShardEntry]:
        """Write the buffered images as one shard (no-op when nothing is buffered). Ctrl-C waits until the
        shard is committed (or not started): the manifest and this writer never disagree."""
        if not self._pending_ids:
            return None
        with _sigint_deferred():
            return self._commit_pending()

    def _commit_pending(self) -> ShardEntry:
        index = 1 + max((int(SHARD_PATTERN.match(e.file).group(1)) for e in self.entries), default=-1)
        name = f"part-{index:05d}.parquet"
        path = self.out_dir / name
        schema = self.meta.schema()
        table = pa.concat_tables(self._pending) if self._pending else SCHEMA.empty_table()
        table = table.replace_schema_metadata(schema.metadata)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
            digest = sha256_file(tmp)
        entry = ShardEntry(file=name, rows=table.num_rows, sha256=digest, image_ids=list(self._pending_ids),
                           empty_images=list(self._pending_empty))
        self.entries.append(entry)
        try:
            self._journal(entry)
        except BaseException:
            self.entries.pop()           # not committed: a retry writes the shard again under the same name
            raise
        # Only now, with the manifest on disk, are these images finished.
        self.done.update(self._pending_ids)
        self.rows_written += table.num_rows
        self._pending, self._pending_rows = [], 0
        self._pending_ids, self._pending_empty, self._pending_set = [], [], set()
        if self._journal_entries >= max(FOLD_MIN_ENTRIES, len(self.entries) - self._journal_entries):
            self._fold()
        return entry

    def _journal(self, entry: ShardEntry) -> None:
        """Commit ``entry``: one line appended to the journal and fsynced. A failed write is cut off again, so
        the journal never holds a partial line before a later one. ``_commit_pending`` folds the journal into
        the manifest once it is as long (so the manifest is rewritten about log2(shards) times in a run)."""
        if self._journal_file is None:
            self._journal_file = open(self.out_dir / JOURNAL, "ab")
            fsync_dir(self.out_dir)
        f = self._journal_file
        start = f.tell()
        try:
            f.write(json.dumps(asdict(entry), separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            self._journal_file = None
            with contextlib.suppress(OSError):
                f.truncate(start)
            with contextlib.suppress(OSError):
                f.close()
            raise
        self._journal_entries += 1

    def _fold(self) -> None:
        """Every entry into ``_manifest.json`` (replaced atomically), then the journal deleted. Cut between the
        two, the journal's entries are in both; readers skip the journal's copies."""
        data = {"meta": asdict(self.meta), "shards": [asdict(e) for e in self.entries]}
        atomic_write_bytes(self.out_dir / MANIFEST, json.dumps(data, separators=(",", ":")).encode())
        if self._journal_file is not None:
            self._journal_file.close()
            self._journal_file = None
        (self.out_dir / JOURNAL).unlink(missing_ok=True)
        self._journal_entries = 0

    def has(self, image_id: str) -> bool:
        """Whether the image is finished or buffered for the next shard."""
        return image_id in self.done or image_id in self._pending_set
