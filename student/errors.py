"""The student's one user-facing error type."""
from __future__ import annotations

import os


class StudentError(ValueError):
    """A user-facing problem with the student's inputs (weights file, config): ``"<where>: <problem>"``."""

    def __init__(self, where: str | os.PathLike, problem: str):
        self.where = os.fspath(where)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.where}: {self.problem}")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``exc``'s message (its type name when it has none), for a ``StudentError``."""
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."
