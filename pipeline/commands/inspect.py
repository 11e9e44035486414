"""``pipeline inspect DIR``: what a shard directory holds; ``--image ID --png OUT`` draws one image's labels;
``--worst K --png OUT`` draws the K lowest-scored labels as a contact sheet, so a person reviews the doubtful ones
first."""
from __future__ import annotations

import argparse
import collections
import difflib
import heapq
import json
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pyarrow.parquet as pq

from ..datasets.images import read_image_rgb
from ..errors import UserError
from ..render import contact_sheet, label_tile, overlay
from ..shards import SCHEMA, decode_rle, read_manifest, read_rejects, read_shard, rle_area, sha256_file

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.quantile(np.asarray(values, np.float64), QUANTILES)
    return {f"p{round(100 * k)}": float(v) for k, v in zip(QUANTILES, q)}


def summarize(out_dir: str | Path) -> dict:
    """Counts and distributions of a shard directory, reading one shard at a time."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    meta = manifest["meta"]
    names = {c["id"]: c["name"] for c in meta.get("classes", [])}
    per_class: dict[int, int] = collections.Counter()
    areas, scores, corrupt = [], [], []
    images_with_rows: set[str] = set()
    rows = 0
    schema = None
    for entry in manifest["shards"]:
        path = out_dir / entry["file"]
        if not path.exists():
            corrupt.append(f"{entry['file']}: missing")
            continue
        if sha256_file(path) != entry["sha256"]:
            corrupt.append(f"{entry['file']}: sha256 differs from the manifest (not counted)")
            continue
        table = read_shard(path, columns=["image_id", "category_id", "mask_rle", "score", "height", "width"])
        if schema is None:  # as written on disk, from the first intact shard
            schema = pq.read_schema(path).remove_metadata()
        cols = table.to_pydict()
        rows += table.num_rows
        images_with_rows.update(cols["image_id"])
        per_class.update(cols["category_id"])
        scores.extend(cols["score"])
        areas.extend(rle_area(c, h, w) for c, h, w in zip(cols["mask_rle"], cols["height"], cols["width"]))
    finished = [i for e in manifest["shards"] for i in e["image_ids"]]
    rejects = read_rejects(out_dir)
    return {
        "dir": str(out_dir), "meta": meta, "schema": str(schema or SCHEMA), "shards": len(manifest["shards"]), "rows": rows,
        "images": len(finished), "images_with_instances": len(images_with_rows),
        "duplicate_images": len(finished) - len(set(finished)),
        "per_class": [{"category_id": cid, "category": names.get(cid, str(cid)), "instances": n}
                      for cid, n in sorted(per_class.items())],
        "mask_area": _quantiles(areas), "score": _quantiles(scores),
        "rejects": len(rejects), "rejects_by_stage": dict(collections.Counter(r.get("stage") for r in rejects)),
        "reject_examples": rejects[:10], "problems": corrupt,
    }


def format_summary(s: dict) -> str:
    m = s["meta"]
    lines = [
        f"shard directory {s['dir']}",
        f"  dataset {m['dataset']} (split {m['split']}, root {m['data_root']}), round {m['round']}, "
        f"teacher {m['teacher']}, config digest {m['config_digest']}, schema version {m['schema_version']}",
        f"  {s['shards']} shards, {s['rows']} rows (instances), {s['images']} images finished "
        f"({s['images_with_instances']} with instances), {s['rejects']} rejects",
        "schema:",
        *("  " + line for line in s["schema"].splitlines()),
        "per class:",
        f"  {'id':>4}  {'category':<20} {'instances':>9}",
        *(f"  {c['category_id']:>4}  {c['category']:<20} {c['instances']:>9}" for c in s["per_class"]),
    ]
    for key, title, fmt in (("mask_area", "mask area (px)", "{:.0f}"), ("score", "score", "{:.3f}")):
        q = s[key]
        lines.append(f"{title}: " + ("  ".join(f"{k} {fmt.format(v)}" for k, v in q.items()) if q else "no rows"))
    if s["rejects"]:
        stages = ", ".join(f"{k} {v}" for k, v in sorted(s["rejects_by_stage"].items(), key=str))
        lines.append(f"rejects ({stages}):")
        lines.extend(f"  {r.get('image_id') or '-'}  {r.get('file')}: {r.get('reason')}" for r in s["reject_examples"])
        if s["rejects"] > len(s["reject_examples"]):
            lines.append(f"  ... {s['rejects'] - len(s['reject_examples'])} more in _rejects.jsonl")
    for problem in s["problems"]:
        lines.append(f"PROBLEM: {problem}")
    if s["duplicate_images"]:
        lines.append(f"PROBLEM: {s['duplicate_images']} images are listed in more than one shard")
    return "\n".join(lines)


def resolve_image_id(out_dir: str | Path, wanted: str) -> str:
    """The stored image id a user means: the id as stored, the image's file name or its stem (COCO file
    ``000000090122.jpg`` holds id ``90122``), or that number without leading zeros. Otherwise a one-line error
    listing close matches."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    ids = [i for e in manifest["shards"] for i in e["image_ids"]]
    if wanted in ids:
        return wanted
    if wanted.isdigit() and str(int(wanted)) in ids:
        return str(int(wanted))
    names: dict[str, str] = {}
    for entry in manifest["shards"]:
        for e in entry["empty_images"]:
            names[e["file_name"]] = e["image_id"]
        cols = read_shard(out_dir / entry["file"], columns=["image_id", "file_name"]).to_pydict()
        names.update(zip(cols["file_name"], cols["image_id"]))
    by_name = {}
    for file_name, image_id in names.items():
        path = Path(file_name)
        by_name.update({file_name: image_id, path.name: image_id, path.stem: image_id})
    if wanted in by_name:
        return by_name[wanted]
    close = difflib.get_close_matches(wanted, list(dict.fromkeys(ids + list(by_name))), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise UserError(wanted, f"image id is not in the finished shards of {out_dir}{hint}")


def image_rows(out_dir: str | Path, image_id: str) -> tuple[list[dict], Optional[dict]]:
    """The rows of one image (``resolve_image_id`` finds it), and its manifest entry for an image without
    instances."""
    out_dir = Path(out_dir)
    image_id = resolve_image_id(out_dir, image_id)
    manifest = read_manifest(out_dir)
    for entry in manifest["shards"]:
        if image_id in entry["image_ids"]:
            table = read_shard(out_dir / entry["file"], filters=[("image_id", "=", image_id)])
            empty = next((e for e in entry["empty_images"] if e["image_id"] == image_id), None)
            return table.to_pylist(), empty
    raise UserError(image_id, f"image id is not in the finished shards of {out_dir}")


def _data_root(out_dir: str | Path, data_root: Optional[str]) -> Path:
    return Path(data_root or read_manifest(out_dir)["meta"]["data_root"])


def _read_image(root: Path, info: dict) -> np.ndarray:
    """The (H,W,3) uint8 RGB image a row (or an empty-image entry) names; a one-line error when it does not match
    the size the shards recorded."""
    image = read_image_rgb(root / info["file_name"])
    if image.shape[:2] != (info["height"], info["width"]):
        raise UserError(root / info["file_name"], f"image is {image.shape[1]}x{image.shape[0]}, the shards "
                                                  f"say {info['width']}x{info['height']} (wrong --data-root?)")
    return image


def render_image(out_dir: str | Path, image_id: str, data_root: Optional[str] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the image with its pseudo masks, boxes and 'category score' captions."""
    rows, empty = image_rows(out_dir, image_id)
    image = _read_image(_data_root(out_dir, data_root), rows[0] if rows else empty)
    masks = [decode_rle(r["mask_rle"], r["height"], r["width"]) for r in rows]
    boxes = np.array([r["box"] for r in rows], np.float32).reshape(-1, 4)
    texts = [f"{r['category']} {r['score']:.2f}" for r in rows]
    return overlay(image, masks, boxes, texts)


def worst_rows(out_dir: str | Path, k: int) -> list[dict]:
    """The ``k`` rows with the lowest score (ties by image and instance id), reading one shard at a time and
    keeping at most ``k`` rows in memory."""
    out_dir = Path(out_dir)
    keep: list[dict] = []
    columns = ["image_id", "instance_id", "file_name", "height", "width", "category", "box", "mask_rle", "score"]
    for entry in read_manifest(out_dir)["shards"]:
        rows = read_shard(out_dir / entry["file"], columns=columns).to_pylist()
        keep = heapq.nsmallest(k, keep + rows, key=lambda r: (r["score"], r["image_id"], r["instance_id"]))
    return keep


def render_worst(out_dir: str | Path, k: int, data_root: Optional[str] = None, columns: int = 6) -> np.ndarray:
    """(H,W,3) uint8 RGB contact sheet of the ``k`` lowest-scored labels, lowest first, each captioned
    'score category image_id'."""
    rows = worst_rows(out_dir, k)
    if not rows:
        raise UserError(out_dir, "no labels in the finished shards")
    root = _data_root(out_dir, data_root)
    image_id, image = None, None  # rows of one image are often neighbours: keep the last image read
    tiles = []
    for r in rows:
        if r["image_id"] != image_id:
            image_id, image = r["image_id"], _read_image(root, r)
        mask = decode_rle(r["mask_rle"], r["height"], r["width"])
        tiles.append(label_tile(image, mask, np.asarray(r["box"], np.float32),
                                f"{r['score']:.2f} {r['category']} {r['image_id']}"))
    return contact_sheet(tiles, columns)


def _write_png(path: str, drawn: np.ndarray) -> None:
    png = Path(path)
    png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(png), drawn[:, :, ::-1]):
        raise UserError(png, "cannot write PNG")
    print(f"wrote {png}")


def run(args: argparse.Namespace) -> int:
    if args.worst is not None:
        if args.worst < 1:
            raise UserError("--worst", f"expected a count >= 1, got {args.worst}")
        if args.png is None or args.image is not None:
            raise UserError("--worst", "give --worst K with --png OUT (and without --image)")
        _write_png(args.png, render_worst(args.dir, args.worst, args.data_root))
        return 0
    if args.image is not None or args.png is not None:
        if args.image is None or args.png is None:
            raise UserError("--image/--png", "give both --image ID and --png OUT")
        _write_png(args.png, render_image(args.dir, args.image, args.data_root))
        return 0
    summary = summarize(args.dir)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 1 if summary["problems"] or summary["duplicate_images"] else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a pseudo-label shard directory, draw one image's labels, or the worst-scored ones",
                       description="Schema, row and image counts, per-class counts, mask-area and score "
                                   "quantiles, rejects and shard integrity of a shard directory.")
    p.add_argument("dir", help="shard directory (written by 'pipeline label')")
    p.add_argument("--image", metavar="ID", help="image to draw (with --png): its id as stored, or its file name or "
                                                 "stem; each instance in its own colour, so who won each overlap "
                                                 "shows, and pixels two labels share (teacher.occlusion off) in white")
    p.add_argument("--worst", type=int, metavar="K", help="draw the K lowest-scored labels as a contact sheet "
                                                           "(with --png), lowest first")
    p.add_argument("--png", metavar="OUT", help="write the drawing of --image or --worst here")
    p.add_argument("--data-root", metavar="DIR", help="dataset root (default: the one recorded in the shards)")
    p.add_argument("--json", action="store_true", help="print the summary as json")
    p.set_defaults(func=run)
