"""``pipeline run``: the self-training loop, round after round, in one run folder on one Ray cluster.

Round 0 labels the training split with the box-prior teacher. Each round r >= 1 trains the student (Ray Train)
on the boxes and round r-1's pseudo labels, labels the split again with the network-mode teacher (the student's
EMA weights fused with the box prior), and evaluates: pseudo-label IoU against ground truth, score Spearman, and
the student's mask AP and box-as-mask AP on evaluation.split. From round 2 on the student starts from the previous
round's weights (run.warm_start). `--dataset toy` generates its data on first use.

The run folder (--out, default runs/<run.name>) holds config.yaml, round-<r>/{labels,checkpoint,metrics.json},
report.md with plots/, and logs/run.log. Re-running the same command (or --resume) continues from the last
finished stage, inside a labeling stage (finished images are kept) and inside a training stage (from its newest
checkpoint); nothing finished is redone. A run folder started with another config is refused, naming the
differing keys; worker counts, --rounds and --address may change between invocations.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..log import add_file_log
from .common import add_address_arg, add_config_args, add_dataset_args, at_least_one, config_from_args, connect_ray


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="the self-training rounds: label, train, label, evaluate -> report.md",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--rounds", type=int, metavar="N",
                   help="trained rounds after the box-prior round 0 (default: run.rounds, 3)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: <run.root>/<run.name>, runs/toy for toy)")
    p.add_argument("--workers", type=int, metavar="N", help="Ray Train workers (default: student.workers)")
    p.add_argument("--label-workers", type=int, metavar="N",
                   help="label workers (default: label.workers, auto = as many as the cluster's CPUs allow)")
    add_address_arg(p, "; with more than one node --out must be on storage every node can read")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (an error if there is none); re-running without it does the "
                        "same when the folder exists")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if at_least_one("--rounds", args.rounds) is not None:
        cfg.run.rounds = args.rounds
    if at_least_one("--workers", args.workers) is not None:
        cfg.student.workers = args.workers
    if at_least_one("--label-workers", args.label_workers) is not None:
        cfg.label.workers = args.label_workers
    if cfg.dataset.root:
        cfg.dataset.root = os.path.abspath(cfg.dataset.root)
    if cfg.dataset.ann:
        cfg.dataset.ann = os.path.abspath(cfg.dataset.ann)
    if cfg.evaluation.ann:
        cfg.evaluation.ann = os.path.abspath(cfg.evaluation.ann)
    from ..rounds import RoundRunner, RunFolder  # torch: see pipeline.cli's docstring

    folder = RunFolder(args.out or Path(cfg.run.root) / cfg.run.name)
    folder.check(cfg, args.resume)
    runner = RoundRunner(cfg, folder, cfg.run.rounds)
    runner.check_inputs()
    folder.write_config(cfg)
    print(f"run folder {folder.path}: {cfg.dataset.name}, rounds 0-{cfg.run.rounds}", flush=True)
    handler = add_file_log(folder.path / "logs" / "run.log")
    try:
        connect_ray(cfg, args.address)
        runner.run()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return 0
