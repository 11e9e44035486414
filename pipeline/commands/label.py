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

With --index DIR (a dataset index written by 'pipeline index', e.g. of OpenImages) the images are streamed from
the index through a Ray Data pipeline onto an actor pool of label workers; the driver holds no dataset, so any
size fits. The shards, resume and rejects are the same. Without --config the config is the shipped one of the
index's dataset kind (configs/coco.yaml for a COCO index, as --dataset coco would pick; OpenImages has none and
takes configs/toy.yaml's).
"""
from __future__ import annotations

import argparse

from ..config import Config
from .common import (DATASETS, add_address_arg, add_config_args, add_dataset_args, at_least_one, config_from_args,
                     connect_ray)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("label", help="label boxes with pseudo masks on Ray workers -> Parquet shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--index", metavar="DIR",
                   help="label the images of a dataset index (written by 'pipeline index') through a Ray Data "
                        "pipeline: the driver reads no annotations and holds no dataset, so any size fits; the "
                        "--dataset options are then not read")
    p.add_argument("--out", required=True, metavar="DIR", help="shard directory to write (or resume)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="teacher.pt of a trained student: network mode (default: box-prior mode, "
                        "no network)")
    p.add_argument("--workers", type=int, metavar="N", help="label workers (default: label.workers, auto = as many as the cluster's "
                        "CPUs allow)")
    add_address_arg(p)
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


def label_config(args: argparse.Namespace) -> Config:
    """The run's ``Config``: as every command's, except that with ``--index`` and neither ``--config`` nor
    ``--dataset`` it starts from the shipped config of the index's dataset kind, so that its teacher settings (and
    the shard directory's config digest) are those of ``--dataset KIND`` on the same data."""
    if args.index and not args.config and not args.dataset:
        from ..index import IndexSource

        kind = IndexSource(args.index).kind
        if kind in DATASETS:
            args = argparse.Namespace(**{**vars(args), "dataset": kind})
    return config_from_args(args)


def run(args: argparse.Namespace) -> int:
    from ..labeling import prepare_label, run_label  # torch: see pipeline.cli's docstring

    cfg = label_config(args)
    if at_least_one("--workers", args.workers) is not None:
        cfg.label.workers = args.workers
    at_least_one("--limit", args.limit)
    service = prepare_label(cfg, args.out, args.checkpoint, args.round, limit=args.limit, overwrite=args.overwrite,
                            retry_rejects=args.retry_rejects, index=args.index)
    connect_ray(cfg, args.address)
    summary = run_label(service, args.out)
    print(summary.line())
    print(f"inspect with: pipeline inspect {args.out}")
    return 0
