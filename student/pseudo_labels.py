"""Pseudo labels of a shard directory, for training: masks, scores and correspondences by (image_id, instance_id).

Reads only the Parquet files that the manifest lists (``boxmask_common.manifest``; a file not in it is
unfinished), with plain pyarrow: the student does not import the pipeline that wrote them. Rows stay in Arrow tables; a row is decoded
only when an image that needs it is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from boxmask_common.errors import UserError, one_line
from boxmask_common.manifest import read_manifest

COLUMNS = ["image_id", "instance_id", "height", "width", "mask_rle", "score", "correspondences"]


@dataclass
class Correspondence:
    """Matches of one instance with one partner: src / dst cells of g x g grids (row-major), weights."""

    partner: tuple[str, int]
    grid: int
    src: np.ndarray      # (K,) int64
    dst: np.ndarray      # (K,) int64
    weight: np.ndarray   # (K,) float32


@dataclass
class PseudoLabel:
    mask: np.ndarray     # (H, W) bool, full image
    score: float
    correspondences: list[Correspondence]


class PseudoLabels:
    """Index of a shard directory: ``get(image_id, instance_id)`` -> ``PseudoLabel`` or None."""

    def __init__(self, tables: list[pa.Table], source: str):
        self.source = source
        self._tables = tables
        self._index: dict[tuple[str, int], tuple[int, int]] = {}
        for t, table in enumerate(tables):
            ids = table.column("image_id").to_pylist()
            inst = table.column("instance_id").to_pylist()
            for r, key in enumerate(zip(ids, inst)):
                self._index[(str(key[0]), int(key[1]))] = (t, r)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "PseudoLabels":
        path = Path(path)
        shards = read_manifest(path)["shards"]
        tables = []
        for entry in shards:
            file = path / str(entry["file"])
            try:
                tables.append(pq.read_table(file, columns=COLUMNS))
            except FileNotFoundError:
                raise UserError(file, "shard listed in the manifest is missing") from None
            except (OSError, pa.ArrowException) as exc:
                raise UserError(file, f"unreadable shard ({one_line(exc)})") from None
        return cls(tables, os.fspath(path))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._index

    def get(self, image_id: str, instance_id: int) -> PseudoLabel | None:
        where = self._index.get((str(image_id), int(instance_id)))
        if where is None:
            return None
        table = self._tables[where[0]]
        row = {name: table.column(name)[where[1]].as_py() for name in COLUMNS}
        rle = {"size": [int(row["height"]), int(row["width"])], "counts": row["mask_rle"].encode("ascii")}
        corr = [Correspondence((str(c["partner_image_id"]), int(c["partner_instance_id"])), int(c["grid"]),
                               np.asarray(c["src"], np.int64), np.asarray(c["dst"], np.int64),
                               np.asarray(c["weight"], np.float32))
                for c in row["correspondences"] or []]
        return PseudoLabel(mask_utils.decode(rle).astype(bool), float(row["score"]), corr)
