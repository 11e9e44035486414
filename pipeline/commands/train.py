"""``pipeline train``: train the student (Mask R-CNN) from boxes, and from pseudo labels when --labels is given.

Runs on Ray Train (``student.workers`` DDP workers; gloo on CPU, nccl on GPU). Checkpoints go to OUT every
student.checkpoint_every iterations; a dead worker is restarted from the newest one, and --resume continues an
interrupted run from it. At the end OUT holds student.pt and teacher.pt (the EMA weights, the next round's
teacher), both loadable with torch.load(weights_only=True), and train_log.jsonl with the per-term losses.
"""
from __future__ import annotations

import argparse
import logging
import os

from tqdm import tqdm

from student.model import StudentError
from student.train import TrainJob, effective_lr, fit

from ..config import Config
from ..datasets import build_dataset
from ..errors import PipelineError
from ..label_service import init_ray
from ..shards import read_manifest
from .common import add_config_args, add_dataset_args, at_least_one, config_from_args

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the student detector on Ray Train -> student.pt, teacher.pt",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--labels", metavar="SHARD_DIR",
                   help="pseudo-label shards (masks, scores, correspondences); default: boxes only")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder for checkpoints, log and exports")
    p.add_argument("--workers", type=int, metavar="N", help="Ray Train workers (default: student.workers)")
    p.add_argument("--iterations", type=int, metavar="N", help="training steps (default: student.iterations)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--address", metavar="ADDR",
                   help="existing Ray cluster (default: $RAY_ADDRESS, else a local cluster)")
    add_config_args(p)
    p.set_defaults(func=run)


def check_labels(labels: str, dataset_name: str, split: str) -> None:
    """The shard directory exists and was written for this dataset and split."""
    meta = read_manifest(labels)["meta"]
    for key, want in (("dataset", dataset_name), ("split", split)):
        have = meta.get(key) if isinstance(meta, dict) else None
        if have is not None and str(have) != want:
            raise PipelineError(labels, f"shards were written for {key} {have!r}, training uses {want!r}")


def build_job(cfg: Config, out: str, labels: str | None = None) -> TrainJob:
    """The training job of a config: the split's samples (boxes, classes, depth; never masks), its classes and
    the pseudo-label shards, with every path absolute (workers may run elsewhere)."""
    if labels:
        check_labels(labels, cfg.dataset.name, cfg.dataset.split)
    if cfg.dataset.root:
        cfg.dataset.root = os.path.abspath(cfg.dataset.root)
    dataset = build_dataset(cfg.dataset)
    if len(dataset) == 0:
        raise PipelineError(cfg.dataset.name, f"split {cfg.dataset.split} has no usable images")
    classes = [{"id": c.id, "name": c.name} for c in dataset.categories]
    cfg.student.correspondence_grid = cfg.teacher.correspondence.grid
    cfg.student.correspondence_pad = cfg.teacher.box_prior.pad
    return TrainJob(cfg=cfg.student, samples=list(dataset), classes=classes, out=os.path.abspath(out),
                    dataset=cfg.dataset.name, labels_dir=os.path.abspath(labels) if labels else "")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if at_least_one("--workers", args.workers) is not None:
        cfg.student.workers = args.workers
    if at_least_one("--iterations", args.iterations) is not None:
        cfg.student.iterations = args.iterations
    job = build_job(cfg, args.out, args.labels)
    s = cfg.student
    print(f"{cfg.dataset.name} {cfg.dataset.split}: {len(job.samples)} images, {len(job.classes)} classes; "
          f"{'pseudo labels from ' + args.labels if args.labels else 'boxes only'}; backbone {s.backbone}, "
          f"{s.iterations} iterations x {s.batch_size} images on {s.workers} workers, lr {effective_lr(s):g}",
          flush=True)
    url = init_ray(cfg.run, args.address)
    print(f"Ray dashboard: {url or 'not available on this cluster'}", flush=True)
    bar = tqdm(total=s.iterations, unit="it", desc="train", dynamic_ncols=True)

    def progress(rec: dict) -> None:
        bar.update(rec["iteration"] - bar.n)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2g}")
        terms = " ".join(f"{k[5:]}={v:.3f}" for k, v in sorted(rec.items()) if k.startswith("loss_"))
        log.info("iter %d loss %.4f %s", rec["iteration"], rec["loss"], terms)

    try:
        result = fit(job, resume=args.resume, progress=progress)
    except StudentError as exc:
        raise PipelineError(exc.where, exc.problem) from None
    finally:
        bar.close()
    print(f"student: {result['student']}\nteacher: {result['teacher']}")
    print(f"evaluate with: pipeline eval --dataset {cfg.dataset.name} --checkpoint {result['teacher']}")
    return 0
