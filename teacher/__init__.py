"""The structured teacher: affinity objectives, mean-field CRF, correspondence, memory bank and
asymmetric-affinity refinement. Imports ``kernels`` only; never the student or the pipeline."""
