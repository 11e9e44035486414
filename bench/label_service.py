"""Benchmark: label-service throughput with 1 and 2 Ray label workers (box-prior teacher, toy data).

Generates a dozen toy images at Cityscapes resolution (1024x2048) into the toy cache, writes their dataset
index, starts one local Ray cluster and runs ``LabelService`` over the index once per worker count, each into a
fresh shard directory. Throughput counts labeling time (from the start of the Ray Data pipeline to its last
result; the workers start inside it, so a short run undercounts). Idle fraction of a worker = 1 - (time inside label_batch) / (labeling time). cpu/busy = worker CPU
seconds per labeling second: near 1 when each single-threaded worker has a core, well below 1 when the
machine is shared (then 2 workers cannot scale). Peak resident memory is ``ru_maxrss`` of the driver
(whole script) and of each worker process; "driver +RSS" is the driver's resident memory after a run minus
before it (flat: the driver streams rows to shards).

Each worker has its own memory bank, so with 2 workers each bank sees half the images: the per-image work
is not identical between the two runs (fewer bank partners early on), which the table's instances column
lets you judge.

Prints a table and ends with one JSON line (both recorded as bench/results/label_service.json, bench/results.py):
{"images_per_s_1", "images_per_s_2", "scaling", "idle_fraction_1", "idle_fraction_2",
 "driver_peak_rss_mib", "worker_peak_rss_mib", ...}.

The box-prior teacher labels a toy image in a few tenths of a second, so a dozen images make a window of a
few seconds; ``--images 48`` gives steadier figures.

Run: .venv/bin/python bench/label_service.py [--images 12] [--size 1024x2048] [--set teacher.crf.iters=5]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, bench/ is first on sys.path and its scripts (e.g. bench/teacher.py) would shadow the packages.
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.config import config_path_for, load_config  # noqa: E402
from pipeline.datasets import build_index  # noqa: E402
from pipeline.index import IndexSource  # noqa: E402
from pipeline.label_service import LabelService, TeacherFactory, init_ray, label_digest  # noqa: E402
from pipeline.shards import BOX_PRIOR  # noqa: E402
from bench import results as bench_results  # noqa: E402


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc), to show the driver stays flat during labeling."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_once(cfg, workers: int, index: IndexSource, out: Path) -> dict:
    cfg.label.workers = workers
    service = LabelService(cfg.label, out, index, TeacherFactory(cfg.teacher, None), BOX_PRIOR,
                           label_digest(index.fingerprint(), cfg.teacher, BOX_PRIOR, 0), device=cfg.teacher.device)
    rss_before = current_rss_mib()
    t0, c0 = time.monotonic(), time.process_time()
    summary = service.run()
    wall, driver_cpu = time.monotonic() - t0, time.process_time() - c0
    busy = [w["busy_s"] for w in summary.worker_stats]
    cpu = sum(w["cpu_s"] for w in summary.worker_stats)
    label_s = summary.labeling_seconds
    return {
        "workers": workers, "images": summary.images_labeled, "instances": summary.instances,
        "rejects": summary.rejects, "wall_s": wall, "labeling_s": label_s, "driver_cpu_s": driver_cpu,
        "driver_rss_growth_mib": current_rss_mib() - rss_before,
        "images_per_s": summary.images_labeled / label_s if label_s > 0 else 0.0,
        "idle_fraction": (sum(max(0.0, 1 - b / label_s) for b in busy) / len(busy)) if busy and label_s else 0.0,
        # CPU seconds per busy second: ~1 for a single-threaded worker with a core to itself; less means the
        # worker waited for a CPU (a shared or oversubscribed machine), more means it ran several threads.
        "cpu_per_busy": cpu / sum(busy) if busy and sum(busy) > 0 else 0.0,
        "worker_peak_rss_mib": max((w["peak_rss_mib"] for w in summary.worker_stats), default=0.0),
        # Images whose instance ids a worker keeps at the end (those its memory bank references): bounded by
        # the bank, not the dataset.
        "worker_known_images": max((w["known_images"] for w in summary.worker_stats), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12, help="toy training images (default: 12)")
    parser.add_argument("--size", default="1024x2048", help="toy image size HxW (default: 1024x2048)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default: 1,2)")
    parser.add_argument("--batch-images", type=int, default=1, help="images per batch (default: 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. --set teacher.crf.iters=5")
    args = parser.parse_args()
    cfg = load_config(config_path_for("toy"), [
        f"dataset.toy.train={args.images}", "dataset.toy.val=0", f"dataset.toy.size={args.size}",
        f"label.batch_images={args.batch_images}", "label.shard_rows=100000", *args.overrides])
    counts = [int(w) for w in args.workers.split(",")]
    url = init_ray(cfg.run)
    print(f"Ray dashboard: {url}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        build_index(cfg.dataset, Path(tmp) / "index")     # generates the toy data too, before any timing
        index = IndexSource(Path(tmp) / "index")
        print(f"toy: {index.images} images at {args.size} in {index.root}", flush=True)
        for w in counts:
            results.append(run_once(cfg, w, index, Path(tmp) / f"w{w}"))
            print(f"  {w} worker(s): {results[-1]['images_per_s']:.3f} images/s", flush=True)
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    printed = bench_results.Capture()
    print(f"\n{'workers':>7} {'images':>6} {'inst':>5} {'label s':>8} {'wall s':>7} {'img/s':>7} {'idle':>6} "
          f"{'cpu/busy':>8} {'driver cpu s':>12} {'driver +RSS MiB':>15} {'worker RSS MiB':>14}")
    for r in results:
        print(f"{r['workers']:>7} {r['images']:>6} {r['instances']:>5} {r['labeling_s']:>8.1f} {r['wall_s']:>7.1f} "
              f"{r['images_per_s']:>7.3f} {r['idle_fraction']:>6.1%} {r['cpu_per_busy']:>8.2f} {r['driver_cpu_s']:>12.1f} {r['driver_rss_growth_mib']:>15.1f} "
              f"{r['worker_peak_rss_mib']:>14.0f}")
    print(f"driver peak RSS: {driver_rss:.0f} MiB (whole script, toy generation included)")
    by = {r["workers"]: r for r in results}
    out = {"images": index.images, "size": args.size, "driver_peak_rss_mib": round(driver_rss, 1),
           "worker_peak_rss_mib": round(max(r["worker_peak_rss_mib"] for r in results), 1)}
    for w, r in by.items():
        out[f"images_per_s_{w}"] = round(r["images_per_s"], 4)
        out[f"idle_fraction_{w}"] = round(r["idle_fraction"], 4)
        out[f"instances_{w}"] = r["instances"]
        out[f"cpu_per_busy_{w}"] = round(r["cpu_per_busy"], 3)
        out[f"driver_rss_growth_mib_{w}"] = round(r["driver_rss_growth_mib"], 1)
        out[f"worker_known_images_{w}"] = r["worker_known_images"]
    if 1 in by and 2 in by and by[1]["images_per_s"] > 0:
        out["scaling"] = round(by[2]["images_per_s"] / by[1]["images_per_s"], 3)
    table = printed.stop()
    print(json.dumps(out))
    bench_results.record("label_service", "Label service: 1 and 2 Ray label workers (`bench/label_service.py`)",
                         bench_results.command(), bench_results.fenced(table), out,
                         f"{args.images} toy images at {args.size}, box-prior teacher; images/s counts labeling "
                         "time only (actor start-up left out).")


if __name__ == "__main__":
    main()
