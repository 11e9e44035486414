"""``pipeline label``: boxes -> pseudo masks now, with Ray label workers writing Parquet shards.

Without --checkpoint the structured teacher runs in box-prior mode (no network); with --checkpoint (a teacher.pt
written by 'pipeline train') it runs in network mode, fused with the box prior by default (teacher.unary,
teacher.fusion). Re-running the same
command after an interruption resumes: finished images are skipped and nothing is written twice. Images
an earlier run rejected (listed in DIR/_rejects.jsonl) count as finished too, unless --retry-rejects is
given. A directory written with another config (dataset, split, COCO annotation file content, teacher
settings, checkpoint or round) is refused unless --overwrite is given, which deletes its shards, manifest
and rejects and starts over.

On a Ray cluster with GPUs each worker gets an equal share of them (at most one) and the teacher runs on
its GPU, unless label.gpus_per_worker (0 for none) or teacher.device=cpu says otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os

from tqdm import tqdm

from ..datasets import build_dataset
from ..label_service import (LabelService, TeacherFactory, check_network_classes, init_ray, label_digest,
                             load_checkpoint)
from ..shards import BOX_PRIOR
from .common import add_config_args, add_dataset_args, at_least_one, config_from_args

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("label", help="label boxes with pseudo masks on Ray workers -> Parquet shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="shard directory to write (or resume)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="teacher.pt of a trained student: network mode (default: box-prior mode, "
                        "no network)")
    p.add_argument("--workers", type=int, metavar="N", help="label workers (default: label.workers, auto = as many as the cluster's "
                        "CPUs allow)")
    p.add_argument("--address", metavar="ADDR",
                   help="existing Ray cluster (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--limit", type=int, metavar="N", help="label only the first N images")
    p.add_argument("--round", type=int, default=0, metavar="R",
                   help="round number written to the rows (default: 0, box-prior labeling)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete shards written with another config instead of refusing to mix them")
    p.add_argument("--retry-rejects", action="store_true",
                   help="label again the images an earlier run rejected while loading or labeling them "
                        "(unreadable file, teacher failure, worker lost too often) instead of counting them as "
                        "finished: their lines leave _rejects.jsonl and new failures are recorded again; "
                        "dataset-level rejects stay")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if at_least_one("--workers", args.workers) is not None:
        cfg.label.workers = args.workers
    at_least_one("--limit", args.limit)
    # The network is built here once, so a bad checkpoint is refused before any data is made or worker starts.
    network, teacher_id = load_checkpoint(args.checkpoint) if args.checkpoint else (None, BOX_PRIOR)
    # Only the driver reads the annotations; the workers get the samples (with their file paths) in batches,
    # so the paths must not depend on the working directory of a worker process.
    if cfg.dataset.root:
        cfg.dataset.root = os.path.abspath(cfg.dataset.root)
    dataset = build_dataset(cfg.dataset)
    log.info("%s %s: %d images, %d categories, %d dataset rejects", dataset.name, dataset.split, len(dataset),
             len(dataset.categories), len(dataset.rejects))
    if network is not None:
        check_network_classes(network, [c.id for c in dataset.categories], args.checkpoint)
        del network  # the workers build their own
    service = LabelService(cfg.label, args.out, dataset, TeacherFactory(cfg.teacher, args.checkpoint), teacher_id,
                           label_digest(cfg, teacher_id, args.round), round_=args.round,
                           device=cfg.teacher.device, overwrite=args.overwrite, limit=args.limit,
                           strict=cfg.dataset.strict, dataset_name=cfg.dataset.name,
                           retry_rejects=args.retry_rejects)
    service.check_out_dir()
    url = init_ray(cfg.run, args.address)
    print(f"Ray dashboard: {url or 'not available on this cluster'}", flush=True)
    bar = None

    def on_start(todo: int, skipped: int) -> None:
        nonlocal bar
        if skipped:
            print(f"resuming: {skipped} images already finished in {args.out}", flush=True)
        bar = tqdm(total=todo, unit="img", desc="label", dynamic_ncols=True)

    def progress(event: dict) -> None:
        bar.update(event["images"] + event["rejects"])

    try:
        summary = service.run(progress, on_start)
    finally:
        if bar is not None:
            bar.close()
    print(summary.line())
    print(f"inspect with: pipeline inspect {args.out}")
    return 0
