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
