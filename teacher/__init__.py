"""The structured teacher: affinity objectives, mean-field CRF, correspondence, memory bank and
asymmetric-affinity refinement. Imports ``kernels`` only; never the student or the pipeline."""

from .structured_teacher import InstanceLabel, Match, StructuredTeacher

__all__ = ["InstanceLabel", "Match", "StructuredTeacher"]
