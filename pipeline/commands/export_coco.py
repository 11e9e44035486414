"""``pipeline export-coco DIR --out FILE``: the pseudo labels as a COCO instances json.

Each row becomes an annotation with its compressed RLE ``segmentation`` (the shard's ``mask_rle``
unchanged, so masks round-trip bit-exactly), ``bbox`` (x, y, w, h of the input box), ``area`` (mask
pixels), ``score``, ``category_id``, ``iscrowd`` 0 and the shard's ``instance_id``. Images keep integer ids
when every dataset image id is an integer; otherwise they are numbered 1.. in id order and the dataset id is
kept as ``dataset_image_id``. Images without instances are listed too. The file is written streaming (one
shard in memory at a time) under a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from boxmask_common.files import atomic_path

from ..errors import UserError
from ..shards import read_manifest, read_shard, rle_area


def _images(out_dir: Path, manifest: dict) -> dict[str, dict]:
    images: dict[str, dict] = {}
    for entry in manifest["shards"]:
        cols = read_shard(out_dir / entry["file"], columns=["image_id", "file_name", "height", "width"]).to_pydict()
        for image_id, file_name, h, w in zip(cols["image_id"], cols["file_name"], cols["height"], cols["width"]):
            images.setdefault(image_id, {"file_name": file_name, "height": h, "width": w})
        for e in entry["empty_images"]:
            images.setdefault(e["image_id"], {"file_name": e["file_name"], "height": e["height"], "width": e["width"]})
    numeric = all(i.isdigit() for i in images)
    ordered = sorted(images, key=int) if numeric else sorted(images)
    for n, image_id in enumerate(ordered, 1):
        images[image_id]["id"] = int(image_id) if numeric else n
        if not numeric:
            images[image_id]["dataset_image_id"] = image_id
    return {i: images[i] for i in ordered}


def export_coco(out_dir: str | Path, out_file: str | Path) -> dict:
    """Write the COCO json; returns counts ``{"images", "annotations", "categories"}``."""
    out_dir, out_file = Path(out_dir), Path(out_file)
    manifest = read_manifest(out_dir)
    images = _images(out_dir, manifest)
    categories = [{"id": int(c["id"]), "name": c["name"], "supercategory": ""}
                  for c in manifest["meta"].get("classes", [])]
    meta = manifest["meta"]
    info = {"description": f"boxmask pseudo labels of {meta['dataset']} {meta['split']}, round {meta['round']}, "
                           f"teacher {meta['teacher']}", "config_digest": meta["config_digest"]}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    n_ann = 0
    try:
        with atomic_path(out_file) as tmp, open(tmp, "w") as f:
            f.write('{"info": ' + json.dumps(info) + ', "categories": ' + json.dumps(categories))
            f.write(', "images": ' + json.dumps(list(images.values())) + ', "annotations": [')
            for entry in manifest["shards"]:
                for r in read_shard(out_dir / entry["file"]).to_pylist():
                    x1, y1, x2, y2 = r["box"]
                    ann = {"id": n_ann + 1, "image_id": images[r["image_id"]]["id"], "category_id": r["category_id"],
                           "segmentation": {"size": [r["height"], r["width"]], "counts": r["mask_rle"]},
                           "area": rle_area(r["mask_rle"], r["height"], r["width"]),
                           "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "score": r["score"],
                           "instance_id": r["instance_id"]}
                    f.write((", " if n_ann else "") + json.dumps(ann))
                    n_ann += 1
            f.write("]}\n")
    except OSError as exc:
        raise UserError(out_file, f"cannot write ({exc.strerror or exc})") from None
    return {"images": len(images), "annotations": n_ann, "categories": len(categories)}


def run(args: argparse.Namespace) -> int:
    counts = export_coco(args.dir, args.out)
    print(f"wrote {args.out}: {counts['images']} images, {counts['annotations']} annotations, "
          f"{counts['categories']} categories")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-coco", help="write pseudo labels as a COCO instances json (RLE masks)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="shard directory (written by 'pipeline label')")
    p.add_argument("--out", required=True, metavar="FILE", help="COCO json to write")
    p.set_defaults(func=run)
