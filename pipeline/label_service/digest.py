"""The resume digest of a labeling run: what a shard directory's labels depend on, so that a re-run adds to it
only when it would write the same labels."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ..shards import BOX_PRIOR


def label_digest(dataset_fingerprint: str, teacher_cfg: Any, teacher_id: str, round_: int) -> str:
    """Digest (16 hex) of everything that changes the labels: the dataset's content (``Dataset.fingerprint()``),
    the teacher config (``teacher.config.TeacherConfig``) and weights (``teacher_id``), and the round.

    Worker count, batch sizes, the data root path and the teacher device are left out, so a run may resume with
    other resources or after the data moved.
    """
    teacher = dataclasses.asdict(teacher_cfg)
    for key in ("device", "network_batch"):  # where and how many images per forward pass: same labels
        teacher.pop(key)
    if teacher_id == BOX_PRIOR:  # without a network these choose nothing
        for key in ("unary", "fusion"):
            teacher.pop(key)
    blob = json.dumps({"dataset": dataset_fingerprint, "teacher": teacher, "teacher_id": teacher_id,
                       "round": round_}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
