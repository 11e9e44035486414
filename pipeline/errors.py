"""The one error type the CLI turns into a one-line message."""
from __future__ import annotations

import os


class PipelineError(Exception):
    """A user-facing failure: ``"<where>: <problem>"`` on one line.

    ``where`` is a file path (or a config key, or a dataset name); ``problem`` says what is wrong in words a
    user can act on.
    """

    def __init__(self, where: str | os.PathLike, problem: str):
        self.where = os.fspath(where)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.where}: {self.problem}")


class ConfigError(PipelineError):
    pass


class InputError(PipelineError):
    """Bad input data: unreadable image, malformed json, invalid box, missing depth or camera file."""


def one_line(exc: BaseException, *, last: bool = False, limit: int = 300) -> str:
    """``"<Type>: <line>"``: the first non-empty line of ``exc``'s message, or with ``last`` its last one (Ray's
    errors end with their cause), at most ``limit`` characters, for a log line or a ``PipelineError``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[-1 if last else 0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
