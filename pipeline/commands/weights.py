"""``pipeline weights``: the pretrained backbone files ``student.weights: imagenet`` reads.

They are torchvision's ImageNet weights, kept in torch's hub cache ($TORCH_HOME/hub/checkpoints, default
~/.cache/torch/hub/checkpoints), where torchvision itself downloads them.

    pipeline weights list                                     each backbone's file and whether it is cached
    pipeline weights install mobilenet_v2                     download through torchvision (needs the model hub)
    pipeline weights install mobilenet_v2 --from FILE         copy a local file (a machine without internet)

Every file is checked against torchvision's sha256 before it enters the cache: the hash prefix in its name, and
the whole digest where it is known. A wrong file is refused and the cache is left as it was.
"""
from __future__ import annotations

import argparse

from student.config import IMAGENET_BACKBONES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights", help="list or install the pretrained backbone files (student.weights: imagenet)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    lister = sub.add_parser("list", help="each known backbone's ImageNet file, its cache path and whether it is there")
    lister.set_defaults(func=run_list)
    installer = sub.add_parser("install", help="put a backbone's ImageNet file into torch's cache, sha256-checked")
    installer.add_argument("backbone", choices=IMAGENET_BACKBONES, help="the student.backbone whose weights to install")
    installer.add_argument("--from", dest="source", metavar="FILE",
                           help="copy this file instead of downloading it (its name may differ; its digest may not)")
    installer.set_defaults(func=run_install)


def run_list(args: argparse.Namespace) -> int:
    from student.weights import listing  # torch: see pipeline.cli's docstring

    rows = listing()
    width = max(len(r["backbone"]) for r in rows)
    for r in rows:
        state = "cached " if r["cached"] else "missing"
        print(f"{r['backbone']:<{width}}  {state}  {r['path']}")
    return 0


def run_install(args: argparse.Namespace) -> int:
    from student.weights import install  # torch: see pipeline.cli's docstring

    path = install(args.backbone, args.source)
    print(f"{args.backbone}: {path} (sha256 checked)")
    return 0
