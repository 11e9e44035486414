"""Shard commits as a shard directory grows: what one commit costs the labeling driver at OpenImages scale.

A ``ShardWriter`` (``pipeline/shards.py``) commits ``--images`` images, ``--per-shard`` per shard (one row per
image, a 6x5 mask each, so the shard files stay small and the cost measured is the commit's bookkeeping: the
shard file, its fsync and the manifest). Per tenth of the commits it prints the mean milliseconds per commit and
the bytes the process wrote per commit (``/proc/self/io`` ``wchar``: the shard file, the manifest and its
journal); a commit that rewrote every finished image's id would grow linearly from the first tenth to the last.

    .venv/bin/python bench/shard_commits.py [--images 1000000] [--per-shard 200] [--work DIR]

Prints a table, then one JSON line of the figures (recorded as bench/results/shard_commits.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import results as bench_results  # noqa: E402
from pipeline.shards import ShardMeta, ShardWriter, encode_rle, rows_to_table  # noqa: E402


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise SystemExit("/proc/self/io has no wchar line")


def shard_table(ids: list[str]) -> pa.Table:
    """One row per image id, as the teacher writes them (a 6x5 mask, no correspondences)."""
    mask = encode_rle(np.eye(6, 5, dtype=bool))
    template = rows_to_table([{"image_id": "x", "file_name": "x.jpg", "height": 6, "width": 5, "instance_id": 0,
                               "category_id": 1, "category": "c", "box": [0.0, 0.0, 5.0, 6.0], "mask_rle": mask,
                               "score": 0.5, "round": 0, "teacher": "box-prior", "correspondences": []}])
    table = pa.concat_tables([template] * len(ids))
    return table.set_column(0, "image_id", pa.array(ids, pa.string()))


def commit_times(out: Path, images: int, per_shard: int) -> tuple[list[float], list[int]]:
    """Seconds and bytes written of each commit."""
    meta = ShardMeta(dataset="openimages", split="train", data_root="/data", classes=[{"id": 1, "name": "c"}],
                     config_digest="bench", teacher="box-prior", round=0)
    empty = rows_to_table([])
    seconds, written = [], []
    with ShardWriter(out, meta, shard_rows=per_shard) as writer:
        for start in range(0, images, per_shard):
            ids = [f"{k:016x}" for k in range(start, min(images, start + per_shard))]
            table = shard_table(ids)
            for image_id in ids[:-1]:                  # buffered: the shard's rows come with its last image
                writer.add(image_id, empty)
            w0, t0 = written_bytes(), time.perf_counter()
            writer.add(ids[-1], table)                 # reaches shard_rows: the commit
            seconds.append(time.perf_counter() - t0)
            written.append(written_bytes() - w0)
    return seconds, written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1_000_000, help="images committed (default: 1000000)")
    ap.add_argument("--per-shard", type=int, default=200, help="images per shard (default: 200)")
    ap.add_argument("--work", type=Path, help="folder for the shard directory (default: a temporary one, removed)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="boxmask-commits-"))
    printed = bench_results.Capture()
    t0 = time.perf_counter()
    try:
        seconds, written = commit_times(work / "labels", args.images, args.per_shard)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t0
    n = len(seconds)
    tenth = max(1, n // 10)
    print(f"ShardWriter: {args.images} images, {args.per_shard} per shard, {n} commits")
    print(f"{'commits':>15s} {'images done':>12s} {'ms/commit':>10s} {'KiB written/commit':>19s}")
    deciles = []
    for k in range(0, n, tenth):
        s, w = seconds[k:k + tenth], written[k:k + tenth]
        deciles.append({"ms": 1000 * sum(s) / len(s), "kib": sum(w) / len(w) / 1024})
        print(f"{k + 1:>7d}-{k + len(s):<7d} {(k + len(s)) * args.per_shard:12d} {deciles[-1]['ms']:10.2f} "
              f"{deciles[-1]['kib']:19.1f}")
    print(f"all commits: {sum(seconds):.1f} s of {wall:.1f} s; last tenth / first tenth: "
          f"{deciles[-1]['ms'] / deciles[0]['ms']:.2f}x time, {deciles[-1]['kib'] / deciles[0]['kib']:.2f}x bytes")
    table = printed.stop()
    figures = {"images": args.images, "per_shard": args.per_shard, "commits": n,
               "commit_s_total": round(sum(seconds), 2), "wall_s": round(wall, 1),
               "first_tenth_ms_per_commit": round(deciles[0]["ms"], 2),
               "last_tenth_ms_per_commit": round(deciles[-1]["ms"], 2),
               "first_tenth_kib_per_commit": round(deciles[0]["kib"], 1),
               "last_tenth_kib_per_commit": round(deciles[-1]["kib"], 1),
               "total_mib_written": round(sum(written) / 2**20, 1)}
    print(json.dumps(figures))
    bench_results.record("shard_commits", "Shard commits as the directory grows (`bench/shard_commits.py`)",
                         bench_results.command(), bench_results.fenced(table), figures,
                         "One ShardWriter in one process, the 2-core machine's disk; wchar counts every byte the "
                         "process wrote (shard files, manifest, journal).")


if __name__ == "__main__":
    main()
