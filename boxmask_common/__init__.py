"""Plumbing shared by the student and the pipeline, one copy each: the user-facing error type and its one-line
summary of any exception (``boxmask_common.errors``), atomic file writes and the safe checkpoint load
(``boxmask_common.files``). It imports nothing of this project, so every layer may use it."""
