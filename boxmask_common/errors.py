"""The one user-facing error type, and the one-line summary of any exception that goes into it or a log line."""
from __future__ import annotations

import os
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class UserError(Exception):
    """A failure the user can act on: ``"<where>: <problem>"`` on one line.

    ``where`` is a file path (or a config key, or a dataset name); ``problem`` says what is wrong in words a
    user can act on. The CLI prints it as it is; every command's failures are this type or a subclass.
    """

    def __init__(self, where: str | os.PathLike, problem: str):
        self.where = os.fspath(where)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.where}: {self.problem}")

    def __reduce__(self):
        # Raised in Ray workers and unpickled on the driver: rebuild from the two parts, not from the message.
        return type(self), (self.where, self.problem)


def one_line(exc: BaseException, *, last: bool = False, limit: int = 300) -> str:
    """``"<Type>: <line>"``: the first non-empty line of ``exc``'s message, or with ``last`` its last one (Ray's
    errors end with their cause), at most ``limit`` characters, without terminal colour codes."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[-1 if last else 0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
