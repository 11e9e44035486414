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
import signal
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
    """Flush what was said, stop the Ray processes this command started, and end with 130 without finalizing.

    Neither ``ray.shutdown()`` nor interpreter finalization is safe here. Interrupted while Ray Train starts or
    stops, threads that Ray, gRPC or torch started can call into Python during finalization, and the process aborts
    (SIGABRT, seen on CI). After ``ray.shutdown()``, a thread of Ray Data's that still touches the core worker makes
    Ray end the process itself with status 1 ("The core worker has already been shutdown", seen on CI). So the
    driver leaves by ``os._exit``: a cluster it joined (``--address``) sees the driver gone and ends its actors, and
    the processes of a local cluster it started are sent SIGTERM first, so that the raylet stops its workers and
    agents. Everything a run keeps is already on disk by then, so skipping finalization loses nothing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    terminate_started_processes()
    os._exit(130)


def terminate_started_processes() -> None:
    """SIGTERM, without waiting, to every process this one started, at any depth: the GCS, raylet, dashboard, agents
    and workers of a local Ray node (nothing of a cluster that was joined with ``--address``). All of them are
    signalled at once, from one snapshot of the process tree, because an agent whose raylet is gone first lingers
    for a minute or more and can hold the ports a resumed run needs."""
    children: dict[int, list[int]] = {}
    try:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue            # the process ended while we looked
                children.setdefault(ppid, []).append(int(entry.name))
    except OSError:
        return                          # no /proc: not Linux; the node's own fate sharing is all there is
    todo, found = [os.getpid()], []
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


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
