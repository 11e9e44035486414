"""The pipeline's kinds of ``boxmask_common.errors.UserError``, the one error type the CLI turns into a one-line
message (the student raises the same type, so nothing is converted between the layers)."""
from __future__ import annotations

from boxmask_common.errors import UserError, one_line


class ConfigError(UserError):
    pass


class InputError(UserError):
    """Bad input data: unreadable image, malformed json, invalid box, missing depth or camera file."""


__all__ = ["ConfigError", "InputError", "UserError", "one_line"]
