"""The one CLI: ``pipeline <command>``. Each command lives in ``pipeline.commands.<name>`` and exposes
``register(subparsers)``; errors become one line on stderr and exit status 2.

Building the parser imports every command module, so those modules import torch (and what imports it: the
teacher, the student, Ray Train) inside the functions that run a command, not at their top: ``pipeline --help``
and the commands that never touch a network (``pipeline index`` above all, a driver that streams a whole dataset)
then run in about 100 MiB instead of about 850."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from .errors import UserError
from .log import setup_logging

# Module names under pipeline.commands, in the order `pipeline --help` lists them.
COMMANDS: list[str] = ["run", "make_toy", "summary", "index", "label", "inspect", "export_coco", "train", "eval",
                       "weights"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Boxes in, instance masks out: structured-teacher pseudo labels on Ray, Parquet shards, "
                    "two-stage training.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"pipeline.commands.{name}").register(sub)
    return parser


def _exit_interrupted() -> NoReturn:
    """Leave Ray, flush what was said, and end the process with 130 without finalizing the interpreter.

    Interrupted while Ray Train starts or stops, threads that Ray, gRPC or torch started in this process can still
    call into Python during finalization, and the process then aborts (SIGABRT, "the GIL is released") instead of
    exiting with 130; leaving Ray first was not enough (seen on CI between two stages). Everything a run keeps is
    already on disk by then, so skipping finalization loses nothing."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; re-run the same command to resume", file=sys.stderr)
        _exit_interrupted()
    except Exception:  # a bug, not bad input: keep the traceback for the report
        logging.getLogger("pipeline").exception("unexpected failure")
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
