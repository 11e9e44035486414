"""Scale: what the driver holds as the dataset grows (issue 32), on synthetic OpenImages-format data.

For each size N (default 10k, 100k and 1M images, 10 boxes each) it writes an OpenImages boxes CSV in the real
layout (``oidv6-train-annotations-bbox.csv`` columns, random 16-hex ImageIDs, fractional coordinates, 5 % group
boxes) and a class-descriptions CSV, and a folder of ``<ImageID>.jpg`` files that are hard links to a pool of 16 real
photographs (coco_tiny's), so the disk holds little. Then it runs ``pipeline index`` on it as a child process and
reads that process's peak resident memory (``wait4``) and wall time.

The figures per size: ``index_peak_rss_mib`` and ``index_s`` (building the index). The issue's labeling figures,
``driver_peak_rss_mib`` (the labeling driver), ``first_shard_s`` and ``images_per_s``, are printed as null until
labeling reads the index (the next step of issue 32); the keys are there so the JSON lines keep their shape.

    .venv/bin/python bench/scale.py [--sizes 10000,100000,1000000] [--work DIR] [--keep]

Prints a table, then one JSON line per size, then one JSON line of all figures (recorded as bench/results/scale.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import results as bench_results  # noqa: E402

BOXES_PER_IMAGE = 10
CLASSES = 600
POOL = REPO.parent / "shared" / "devdata" / "coco_tiny" / "images"
HEADER = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
          "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]


def write_dataset(folder: Path, images: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """The synthetic OpenImages sample of ``images`` images (module docstring) -> (image folder, boxes CSV,
    classes CSV). Written in chunks of 100k images, so the generator holds little too."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = folder / "class-descriptions-boxable.csv"
    classes.write_text("".join(f"/m/c{k:04d},Class {k}\n" for k in range(CLASSES)))
    pool = sorted(POOL.glob("*.jpg"))[:16]
    if not pool:
        raise SystemExit(f"{POOL}: no .jpg photographs to link to")
    image_dir = folder / "images"
    image_dir.mkdir(exist_ok=True)
    boxes = folder / "oidv6-train-annotations-bbox.csv"
    with open(boxes, "wb") as out:
        out.write((",".join(HEADER) + "\n").encode())
        for start in range(0, images, 100_000):
            n = min(100_000, images - start)
            ids = np.char.mod("%016x", rng.integers(0, 2**62, n, dtype=np.int64) * 4 + 1).astype(str)
            for image_id, k in zip(ids, rng.integers(0, len(pool), n)):
                os.link(pool[k], image_dir / f"{image_id}.jpg")
            rows = n * BOXES_PER_IMAGE
            x = np.sort(rng.uniform(0, 1, (rows, 2)), 1)
            y = np.sort(rng.uniform(0, 1, (rows, 2)), 1)
            x[:, 1] = np.maximum(x[:, 1], x[:, 0] + 0.02).clip(max=1.0)
            y[:, 1] = np.maximum(y[:, 1], y[:, 0] + 0.02).clip(max=1.0)
            zeros = np.zeros(rows, np.int8)
            table = pa.table({
                "ImageID": np.repeat(ids, BOXES_PER_IMAGE), "Source": np.full(rows, "xclick"),
                "LabelName": np.char.mod("/m/c%04d", rng.integers(0, CLASSES, rows)).astype(str),
                "Confidence": np.ones(rows, np.int8), "XMin": x[:, 0].round(6), "XMax": x[:, 1].round(6),
                "YMin": y[:, 0].round(6), "YMax": y[:, 1].round(6), "IsOccluded": zeros, "IsTruncated": zeros,
                "IsGroupOf": (rng.uniform(size=rows) < 0.05).astype(np.int8), "IsDepiction": zeros,
                "IsInside": zeros})
            pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return image_dir, boxes, classes


def run_measured(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run ``cmd``; (exit status, wall seconds, peak RSS MiB of that process, its stderr's last line)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        last = (err.read().decode(errors="replace").strip().splitlines() or [""])[-1]
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated image counts")
    ap.add_argument("--work", type=Path, help="folder for the data (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and indexes")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="boxmask-scale-"))
    printed = bench_results.Capture()
    rows, lines = [], []
    try:
        for n in sizes:
            folder = work / f"oi-{n}"
            t = time.perf_counter()
            image_dir, boxes, classes = write_dataset(folder, n)
            gen_s = time.perf_counter() - t
            code, secs, rss, last = run_measured([
                sys.executable, "-m", "pipeline.cli", "index", "--dataset", "openimages", "--data-root",
                str(image_dir), "--ann", str(boxes), "--classes", str(classes), "--out", str(folder / "index")])
            if code != 0:
                raise SystemExit(f"pipeline index failed on {n} images: {last}")
            meta = json.loads((folder / "index" / "_index.json").read_text())
            rows.append((n, meta["boxes"], gen_s, secs, rss, boxes.stat().st_size / 2**20))
            lines.append({"images": n, "driver_peak_rss_mib": None, "first_shard_s": None, "images_per_s": None,
                          "index_peak_rss_mib": round(rss, 1), "index_s": round(secs, 1),
                          "index_images_per_s": round(n / secs, 1)})
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"pipeline index on synthetic OpenImages CSVs ({BOXES_PER_IMAGE} boxes per image, {CLASSES} classes, "
          f"images hard-linked to 16 photographs)")
    print(f"{'images':>9s} {'boxes':>10s} {'CSV MiB':>8s} {'generate s':>10s} {'index s':>8s} {'images/s':>9s} "
          f"{'peak RSS MiB':>12s}")
    for n, nb, gen_s, secs, rss, mib in rows:
        print(f"{n:9d} {nb:10d} {mib:8.0f} {gen_s:10.1f} {secs:8.1f} {n / secs:9.0f} {rss:12.1f}")
    if len(rows) > 1:
        print(f"peak RSS at {rows[-1][0]} / at {rows[0][0]} images: {rows[-1][4] / rows[0][4]:.2f}x")
    table = printed.stop()
    for line in lines:
        print(json.dumps(line))
    figures = {f"index_{line['images']}_{k}": v for line in lines for k, v in line.items()
               if k.startswith("index_")}
    if len(rows) > 1:
        figures["index_rss_ratio_largest_smallest"] = round(rows[-1][4] / rows[0][4], 3)
    print(json.dumps(figures))
    bench_results.record("scale", "Scale: building the dataset index from OpenImages CSVs (`bench/scale.py`)",
                         bench_results.command(), bench_results.fenced(table), figures,
                         "Peak RSS of the `pipeline index` process (wait4), the 2-core CPU; the images are hard "
                         "links, so the image-size reads hit the page cache.")


if __name__ == "__main__":
    main()
