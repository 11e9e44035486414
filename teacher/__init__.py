"""The structured teacher: affinity objectives, mean-field CRF, correspondence, memory bank and
asymmetric-affinity refinement. Imports ``kernels`` only; never the student or the pipeline.

The names below load ``structured_teacher`` (and torch) on first use, so a process that only reads the teacher's
config (a driver that never labels) stays light."""
from __future__ import annotations

__all__ = ["InstanceLabel", "Match", "StructuredTeacher"]


def __getattr__(name: str):
    if name in __all__:
        from . import structured_teacher
        return getattr(structured_teacher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
