"""One image's teacher labels as shard rows (``pipeline.shards.SCHEMA``)."""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pyarrow as pa

from ..datasets.base import Sample
from ..shards import correspondence_records, encode_rle, rows_to_table


def sample_rows(sample: Sample, labels: list, category_names: dict[int, str], round_: int, teacher_id: str,
                instance_ids: Optional[Mapping[str, np.ndarray]] = None) -> pa.Table:
    """The teacher's labels of one image as ``SCHEMA`` rows.

    The teacher numbers a partner's instances by position among the boxes it was given; ``instance_ids``
    (image id -> the ``instance_ids`` of the boxes the teacher was given for that image) turns that position
    into the partner's dataset ``instance_id``. A partner image missing from it keeps the position. A label
    list that does not fit the sample is a ``RuntimeError`` (a labeling failure of this image).
    """
    if len(labels) != len(sample.boxes):
        raise RuntimeError(f"teacher returned {len(labels)} labels for {len(sample.boxes)} boxes")
    rows = []
    for k, lab in enumerate(labels):
        mask = np.asarray(lab.mask, bool)
        if mask.shape != (sample.height, sample.width):
            raise RuntimeError(f"teacher mask {k} has shape {mask.shape}, expected {(sample.height, sample.width)}")
        cid = int(sample.classes[k])
        rows.append({
            "image_id": sample.image_id, "file_name": sample.file_name,
            "height": int(sample.height), "width": int(sample.width),
            "instance_id": int(sample.instance_ids[k]), "category_id": cid,
            "category": category_names.get(cid, str(cid)),
            "box": [float(v) for v in sample.boxes[k]], "mask_rle": encode_rle(mask),
            "score": float(np.clip(lab.score, 0.0, 1.0)), "round": round_, "teacher": teacher_id,
            "correspondences": _with_instance_ids(
                correspondence_records(getattr(lab, "correspondences", None) or []), instance_ids or {}),
        })
    return rows_to_table(rows)


def _with_instance_ids(records: list[dict], instance_ids: Mapping[str, np.ndarray]) -> list[dict]:
    for rec in records:
        ids = instance_ids.get(rec["partner_image_id"])
        if ids is not None:
            rec["partner_instance_id"] = int(ids[rec["partner_instance_id"]])
    return records
