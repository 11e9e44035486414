"""Scale: what the driver holds as the dataset grows (issue 32), on synthetic OpenImages-format data.

For each size N (default 10k, 100k and 1M images, 10 boxes each) it writes an OpenImages boxes CSV in the real
layout (``oidv6-train-annotations-bbox.csv`` columns, random 16-hex ImageIDs, fractional coordinates, 5 % group
boxes) and a class-descriptions CSV, and a folder of ``<ImageID>.jpg`` files that are hard links to a pool of 16 real
photographs (coco_tiny's), so the disk holds little. Then it runs ``pipeline index`` on it as a child process and
reads that process's peak resident memory (``wait4``) and wall time.

Then it labels the index (``pipeline label --index``, box-prior teacher, 2 label workers, a local Ray cluster the
command starts itself) for ``--label-s`` seconds after the first shard, kills the command with SIGKILL, starts it
again and waits for its first new shard, and stops it with Ctrl-C. The shards are then checked with plain pyarrow:
no image twice, and the finished images are exactly the first ones of the index (no hole).

The figures per size: ``index_peak_rss_mib`` and ``index_s`` (building the index); ``driver_peak_rss_mib`` (the
labeling command's own process, the larger of its two runs), ``first_shard_s`` (from the command's start to its
first committed shard, Ray's start included), ``images_per_s`` (per worker, first shard to the kill) and
``resume_s`` (from the second start to its first new shard).

    .venv/bin/python bench/scale.py [--sizes 10000,100000,1000000] [--work DIR] [--keep] [--label-s 30]

Prints a table, then one JSON line per size, then one JSON line of all figures (recorded as bench/results/scale.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
from pipeline.errors import UserError  # noqa: E402
from pipeline.shards import read_manifest  # noqa: E402

BOXES_PER_IMAGE = 10
WORKERS = 2
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


def finished(out: Path) -> list[list[str]]:
    """Image ids of each committed shard (the manifest), [] before the first."""
    try:
        return [s["image_ids"] for s in read_manifest(out)["shards"]]
    except UserError:
        return []


def label_until(cmd: list[str], out: Path, more_shards: int, then_s: float, sig: int) -> dict:
    """Run ``cmd`` until ``out`` holds ``more_shards`` more shards than now, ``then_s`` seconds more, then send
    ``sig`` to its process group: {"shard_s" (start to that shard), "images" (finished meanwhile), "after_s",
    "rss_mib" (peak of the command's process)}."""
    before = len(finished(out))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                            start_new_session=True)
    shard_s = None
    try:
        while proc.poll() is None:
            shards = finished(out)
            if shard_s is None and len(shards) >= before + more_shards:
                shard_s, at, done_at = time.monotonic() - start, time.monotonic(), sum(map(len, shards))
            if shard_s is not None and time.monotonic() - at >= then_s:
                break
            time.sleep(0.1)
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} ended (status {proc.returncode}) before the measurement")
        images = sum(map(len, finished(out))) - done_at
        after_s = time.monotonic() - at
        os.killpg(proc.pid, sig)
        _, _, usage = os.wait4(proc.pid, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2.0)              # the killed command's Ray processes exit
    return {"shard_s": shard_s, "images": images, "after_s": after_s, "rss_mib": usage.ru_maxrss / 1024}


def check_shards(out: Path, index: Path) -> int:
    """With plain pyarrow: no image in two shards, every shard's rows belong to the images it lists, and the
    finished images are the first ones of the index. Returns how many are finished."""
    import pyarrow.parquet as pq

    manifest = read_manifest(out)
    ids = [i for s in manifest["shards"] for i in s["image_ids"]]
    if len(ids) != len(set(ids)):
        raise SystemExit(f"{out}: an image is in two shards")
    for s in manifest["shards"]:
        rows = set(pq.read_table(out / s["file"], columns=["image_id"]).column(0).to_pylist())
        if not rows <= set(s["image_ids"]):
            raise SystemExit(f"{out / s['file']}: rows of images the manifest does not list there")
    parts = [index / p["file"] for p in json.loads((index / "_index.json").read_text())["parts"]]
    first: list[str] = []
    for part in parts:
        first.extend(pq.read_table(part, columns=["image_id"]).column(0).to_pylist()[: len(ids) - len(first)])
        if len(first) >= len(ids):
            break
    if set(first) != set(ids):
        raise SystemExit(f"{out}: the finished images are not the index's first {len(ids)} (a hole)")
    return len(ids)


def measure_labeling(index: Path, out: Path, label_s: float) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "label", "--index", str(index), "--out", str(out), "--workers",
           str(WORKERS), "--set", "label.shard_rows=20", "--set", "label.batch_images=2"]
    first = label_until(cmd, out, 1, label_s, signal.SIGKILL)
    resumed = label_until(cmd, out, 1, 5.0, signal.SIGINT)
    done = check_shards(out, index)
    return {"driver_peak_rss_mib": round(max(first["rss_mib"], resumed["rss_mib"]), 1),
            "first_shard_s": round(first["shard_s"], 1),
            "images_per_s": round(first["images"] / first["after_s"] / WORKERS, 3),
            "resume_s": round(resumed["shard_s"], 1), "finished_checked": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated image counts")
    ap.add_argument("--work", type=Path, help="folder for the data (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and indexes")
    ap.add_argument("--label-s", type=float, default=30.0,
                    help="seconds of labeling measured after the first shard (default: 30)")
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
            labeled = measure_labeling(folder / "index", folder / "labels", args.label_s)
            rows.append((n, meta["boxes"], gen_s, secs, rss, boxes.stat().st_size / 2**20, labeled))
            lines.append({"images": n, **{k: v for k, v in labeled.items() if k != "finished_checked"},
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
    for n, nb, gen_s, secs, rss, mib, _ in rows:
        print(f"{n:9d} {nb:10d} {mib:8.0f} {gen_s:10.1f} {secs:8.1f} {n / secs:9.0f} {rss:12.1f}")
    if len(rows) > 1:
        print(f"peak RSS at {rows[-1][0]} / at {rows[0][0]} images: {rows[-1][4] / rows[0][4]:.2f}x")
    print()
    print(f"pipeline label --index ({WORKERS} workers, box prior; killed {args.label_s:g} s after its first shard, "
          f"then resumed)")
    print(f"{'images':>9s} {'driver peak RSS MiB':>19s} {'first shard s':>13s} {'images/s/worker':>15s} "
          f"{'resume s':>8s} {'finished, checked':>17s}")
    for n, *_, lab in rows:
        print(f"{n:9d} {lab['driver_peak_rss_mib']:19.1f} {lab['first_shard_s']:13.1f} {lab['images_per_s']:15.3f} "
              f"{lab['resume_s']:8.1f} {lab['finished_checked']:17d}")
    if len(rows) > 1:
        print(f"driver peak RSS at {rows[-1][0]} / at {rows[0][0]} images: "
              f"{rows[-1][6]['driver_peak_rss_mib'] / rows[0][6]['driver_peak_rss_mib']:.2f}x")
    table = printed.stop()
    for line in lines:
        print(json.dumps(line))
    figures = {f"{line['images']}_{k}": v for line in lines for k, v in line.items() if k != "images"}
    if len(rows) > 1:
        figures["index_rss_ratio_largest_smallest"] = round(rows[-1][4] / rows[0][4], 3)
        figures["driver_rss_ratio_largest_smallest"] = round(
            rows[-1][6]["driver_peak_rss_mib"] / rows[0][6]["driver_peak_rss_mib"], 3)
    print(json.dumps(figures))
    bench_results.record("scale", "Scale: the dataset index from OpenImages CSVs, and labeling it (`bench/scale.py`)",
                         bench_results.command(), bench_results.fenced(table), figures,
                         "Peak RSS of the `pipeline index` and `pipeline label` processes (wait4), the 2-core CPU; "
                         "the images are hard links, so the reads hit the page cache. Labeling starts its own local "
                         "Ray cluster (in first shard s).")


if __name__ == "__main__":
    main()
