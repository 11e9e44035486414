"""The one logging setup: human-readable lines on stderr, level from ``--log-level`` or $PIPELINE_LOG."""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("PIPELINE_LOG") or "INFO").upper()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    # Ray and PIL are chatty at INFO; their warnings still come through.
    for name in ("ray", "PIL", "filelock"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def add_file_log(path: str | os.PathLike) -> logging.Handler:
    """Also write every log line (INFO and up) to ``path``; returns the handler, for ``removeHandler``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return handler
