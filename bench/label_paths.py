"""Benchmark: labeling a dataset in memory (the scheduler) against labeling its index through Ray Data (issue 32).

For toy (Cityscapes layout, generated) and coco_tiny (real COCO photographs, where ../shared is present) it
builds the dataset and its index, then labels the first ``--images`` images with the box-prior teacher and one
label worker, once per path, each into a fresh shard directory, on one local Ray cluster. Both paths must write
the same rows (one worker feeds its memory bank the images in the same order): the script stops if they differ.

Throughput is per worker and path-agnostic: images after the first result divided by the time from the first
result to the last, so neither start-up (Ray Data's plan, actor start, the teacher's first call) nor the driver's
dataset load is in it. "index / memory" is the issue's figure (>= 0.95).

Prints a table, then one JSON line of the figures (recorded as bench/results/label_paths.json).

    .venv/bin/python bench/label_paths.py [--images 100] [--datasets toy,coco_tiny]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import results as bench_results  # noqa: E402
from pipeline.config import config_path_for, load_config  # noqa: E402
from pipeline.datasets import build_dataset, build_index  # noqa: E402
from pipeline.index import IndexSource  # noqa: E402
from pipeline.label_service import LabelService, TeacherFactory, init_ray, label_digest  # noqa: E402
from pipeline.shards import BOX_PRIOR  # noqa: E402

COCO_TINY = Path(__file__).resolve().parents[2] / "shared" / "devdata" / "coco_tiny"


def config(name: str, images: int):
    if name == "toy":
        cfg = load_config(config_path_for("toy"), [f"dataset.toy.train={images}"])
    else:
        cfg = load_config(config_path_for("coco"), [f"dataset.root={COCO_TINY}",
                                                     f"dataset.ann={COCO_TINY / 'annotations.json'}",
                                                     "dataset.holdout=0"])
    cfg.label.workers = 1
    cfg.label.shard_rows = 200
    return cfg


def label(cfg, source, out: Path, limit: int) -> tuple[float, int, list]:
    """Label ``limit`` images of ``source``; (steady images/s, images labeled, sorted rows)."""
    import pyarrow.parquet as pq

    stamps = []

    def progress(event):
        stamps.append((time.monotonic(), event["images"] + event["rejects"]))

    service = LabelService(cfg.label, out, source, TeacherFactory(cfg.teacher, None), BOX_PRIOR,
                           label_digest(source.fingerprint(), cfg.teacher, BOX_PRIOR, 0), device=cfg.teacher.device,
                           dataset_name=cfg.dataset.name, limit=limit)
    summary = service.run(progress)
    done = sum(n for _, n in stamps[1:])
    rate = done / (stamps[-1][0] - stamps[0][0]) if len(stamps) > 1 and stamps[-1][0] > stamps[0][0] else 0.0
    rows = sorted((r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()),
                  key=lambda r: (r["image_id"], r["instance_id"]))
    return rate, summary.images_labeled, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100, help="images labeled per path (default: 100)")
    ap.add_argument("--datasets", default="toy,coco_tiny", help="toy and/or coco_tiny (default: both)")
    args = ap.parse_args()
    names = [n for n in args.datasets.split(",") if n != "coco_tiny" or COCO_TINY.is_dir()]
    printed = bench_results.Capture()
    init_ray(load_config(config_path_for("toy"), []).run)
    figures, rows_out = {}, []
    with tempfile.TemporaryDirectory(prefix="boxmask-paths-") as tmp:
        work = Path(tmp)
        for name in names:
            cfg = config(name, args.images)
            dataset = build_dataset(cfg.dataset)
            build_index(cfg.dataset, work / name / "index")
            index = IndexSource(work / name / "index")
            memory_rate, n_memory, memory_rows = label(cfg, dataset, work / name / "memory", args.images)
            index_rate, n_index, index_rows = label(cfg, index, work / name / "by-index", args.images)
            if memory_rows != index_rows:
                raise SystemExit(f"{name}: the two paths wrote different rows")
            rows_out.append((name, n_memory, len(memory_rows), memory_rate, index_rate))
            figures[f"{name}_images_per_s_memory"] = round(memory_rate, 3)
            figures[f"{name}_images_per_s_index"] = round(index_rate, 3)
            figures[f"{name}_index_over_memory"] = round(index_rate / memory_rate, 3) if memory_rate else None
            figures[f"{name}_identical_rows"] = len(memory_rows)
    print("labeling images/s per worker (box prior, 1 worker), from the first result to the last")
    print(f"{'data':10s} {'images':>6s} {'rows':>6s} {'in memory':>10s} {'index':>8s} {'index / memory':>15s}  rows")
    for name, n, nrows, mem, idx in rows_out:
        print(f"{name:10s} {n:6d} {nrows:6d} {mem:10.3f} {idx:8.3f} {idx / mem if mem else 0:15.3f}  identical")
    table = printed.stop()
    print(json.dumps(figures))
    bench_results.record("label_paths", "Labeling from the index through Ray Data against the dataset in memory "
                         "(`bench/label_paths.py`)", bench_results.command(), bench_results.fenced(table), figures,
                         "One label worker, box-prior teacher, the 2-core CPU; both paths wrote identical rows.")


if __name__ == "__main__":
    main()
