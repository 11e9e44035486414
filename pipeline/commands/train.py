"""``pipeline train``: train the student (Mask R-CNN) from boxes, and from pseudo labels when --labels is given.

Runs on Ray Train (``student.workers`` DDP workers; gloo on CPU, nccl on GPU) as the run OUT/train. Checkpoints
go there every student.checkpoint_every iterations; a dead worker is restarted from the newest one, and --resume
continues an interrupted run from it (refused, naming the keys, when the config changed what a step computes). At
the end OUT holds student.pt and teacher.pt (the EMA weights, the next round's teacher), both loadable with
torch.load(weights_only=True). The per-term losses go to the log as the workers report them.
"""
from __future__ import annotations

import argparse

from ..config import override_keys
from .common import add_address_arg, add_config_args, add_dataset_args, at_least_one, config_from_args, connect_ray


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the student detector on Ray Train -> student.pt, teacher.pt",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--labels", metavar="SHARD_DIR",
                   help="pseudo-label shards (masks, scores, correspondences); default: boxes only")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder for checkpoints, log and exports")
    p.add_argument("--workers", type=int, metavar="N", help="Ray Train workers (default: student.workers)")
    p.add_argument("--iterations", type=int, metavar="N",
                   help="training steps (default: student.iterations); the lr steps and the affinity warm-up keep "
                        "their fractions of the run unless given with --set (--set student.iterations=N sets the "
                        "count alone)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_address_arg(p)
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from student.schedule import effective_lr, stretch_schedule  # torch: see pipeline.cli's docstring
    from ..training import build_job, check_student, loss_terms, run_training

    cfg = config_from_args(args)
    if at_least_one("--workers", args.workers) is not None:
        cfg.student.workers = args.workers
    if at_least_one("--iterations", args.iterations) is not None:
        given = {key.removeprefix("student.") for key in override_keys(args.overrides)}
        cfg.student = stretch_schedule(cfg.student, args.iterations, keep=given)
    check_student(cfg.student)
    job = build_job(cfg, args.out, args.labels)
    s = cfg.student
    print(f"{cfg.dataset.name} {cfg.dataset.split}: {len(job.samples)} images, {len(job.classes)} classes; "
          f"{'pseudo labels from ' + args.labels if args.labels else 'boxes only'}; backbone {s.backbone}, "
          f"{s.iterations} iterations x {s.batch_size} images on {s.workers} workers, lr {effective_lr(s):g}",
          flush=True)
    connect_ray(cfg, args.address)
    result = run_training(job, resume=args.resume)
    last = result["metrics"]
    print(f"trained to iteration {result['iteration']}: loss {last['loss']:.4f} ({loss_terms(last)})")
    print(f"student: {result['student']}\nteacher: {result['teacher']}")
    print(f"evaluate with: pipeline eval --dataset {cfg.dataset.name} --checkpoint {result['teacher']}")
    return 0
