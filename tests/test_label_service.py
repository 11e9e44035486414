"""The label service on a local Ray cluster: exactly once across killed, hung and dying workers and killed
drivers, rejects (and retrying them), named actors in the state API, workers without a dataset, and the real
box-prior teacher through the CLI.

One local cluster is shared by the module (Ray takes 5-20 s to start on 2 cores); the driver-killed test
points a subprocess CLI at it with ``--address``.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import labelkit
import numpy as np
import pytest
from interrupts import interrupt_when
from labelkit import all_rows, assert_exactly_once, metric_sum, scrape_metrics

from pipeline.config import LabelConfig
from pipeline.errors import UserError
from pipeline.label_service import NAMESPACE, LabelService
from pipeline.shards import decode_rle, read_manifest, read_rejects

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]


def service(out, dataset, labeler=None, retry_rejects=False, **label):
    """A service over a ``labelkit`` dataset (object, or its root folder)."""
    cfg = LabelConfig(**{"workers": 2, "batch_images": 2, "shard_rows": 4, **label})
    if not isinstance(dataset, labelkit.FolderDataset):
        dataset = labelkit.FolderDataset(str(dataset))
    return LabelService(cfg, out, dataset, labeler or labelkit.BoxLabelerFactory(), teacher_id="box-prior",
                        config_digest="t1", retry_rejects=retry_rejects)


@pytest.mark.slow
def test_rejects_and_named_actors_while_running_on_workers_without_a_dataset(cluster, tmp_path):
    from ray.util.state import list_actors

    root = labelkit.write_folder_dataset(tmp_path / "data", n=10, corrupt=(3,), missing=(5,), sparse_ids=True)
    dataset = labelkit.FolderDataset(str(root))
    # The workers get the samples from the driver: they never read the annotations (gone now).
    (root / "index.json").unlink()
    seen, events = [], []

    def progress(event):
        events.append(event)
        if not seen:
            seen.extend(a.name for a in list_actors(filters=[("ray_namespace", "=", NAMESPACE),
                                                            ("state", "=", "ALIVE")]))

    svc = service(tmp_path / "out", dataset, labelkit.BoxLabelerFactory(fail_on=("im007",)))
    summary = svc.run(progress)
    assert {"label-worker-0", "label-worker-1"} <= set(seen)
    bad = ("im003", "im005", "im007")
    assert_exactly_once(tmp_path / "out", dataset, rejected=bad)
    rejects = {(r["image_id"], r["stage"]): r for r in read_rejects(tmp_path / "out")}
    assert set(rejects) == {("im003", "load"), ("im005", "load"), ("im007", "label"), (None, "dataset")}
    assert "unreadable image" in rejects["im003", "load"]["reason"] and "img-003.png" in rejects["im003", "load"]["reason"]
    assert "file not found" in rejects["im005", "load"]["reason"]
    assert rejects["im007", "label"] == {"image_id": "im007", "file": "img-007.png", "stage": "label",
                                         "reason": "FloatingPointError: teacher diverged on im007"}
    assert rejects[None, "dataset"]["file"] == "bad.png"
    assert summary.images_labeled == 7 and summary.rejects == 3 and summary.dataset_rejects == 1
    assert "3 rejected, 1 rejected by the dataset loader" in summary.line()
    assert summary.instances == sum(len(s.boxes) for s in dataset if s.image_id not in bad)
    assert sum(e["images"] + e["rejects"] for e in events) == 10
    # A worker keeps the instance ids of the images its bank references (one per class here), not a dataset.
    assert [s["index"] for s in summary.worker_stats] == [0, 1]
    assert all(1 <= s["known_images"] <= 2 for s in summary.worker_stats), summary.worker_stats
    # Dashboard metrics, tagged by worker.
    metrics = scrape_metrics({"boxmask_label_images", "boxmask_label_instances", "boxmask_label_image_seconds",
                              "boxmask_label_batch", "boxmask_label_bank_fill"},
                             lambda found: all(found.values()) and metric_sum(found["boxmask_label_images"]) >= 7
                             and metric_sum(found["boxmask_label_instances"]) >= summary.instances)
    assert all(metrics.values()), {k: len(v) for k, v in metrics.items()}
    images = metrics["boxmask_label_images"]                   # counters are exported as <name>_total
    assert metric_sum(images) == 7 and metric_sum(metrics["boxmask_label_instances"]) == summary.instances
    assert any('worker="0"' in ln for ln in images) and any('worker="1"' in ln for ln in images)
    # Correspondences come through as the documented struct list, partners named by their dataset instance
    # id (the labeler gives positions 0-2; the dataset's ids are 10, 13, 16).
    rows = all_rows(tmp_path / "out")
    category = {(r["image_id"], r["instance_id"]): r["category_id"] for r in rows}
    corr = [(r, c) for r in rows for c in r["correspondences"]]
    assert corr and set(corr[0][1]) == {"partner_image_id", "partner_instance_id", "grid", "src", "dst", "weight"}
    for r, c in corr:
        assert category[c["partner_image_id"], c["partner_instance_id"]] == r["category_id"]
    # Re-running finds nothing to do and writes nothing.
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    again = service(tmp_path / "out", dataset).run()
    assert (again.images_labeled, again.images_skipped, again.shards) == (0, 10, 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert len(read_rejects(tmp_path / "out")) == 4


@pytest.mark.slow
def test_limit_labels_a_prefix_and_strict_stops_at_the_first_bad_input(cluster, tmp_path):
    root = labelkit.write_folder_dataset(tmp_path / "data", n=8, corrupt=(5,))
    dataset = labelkit.FolderDataset(str(root))
    out = tmp_path / "out"
    first = LabelService(LabelConfig(workers=2, batch_images=2), out, dataset, labelkit.BoxLabelerFactory(),
                         "box-prior", "t1", limit=3).run()
    assert first.images_total == 3 and first.images_labeled == 3
    assert {i for s in read_manifest(out)["shards"] for i in s["image_ids"]} == {"im000", "im001", "im002"}
    with pytest.raises(UserError, match=r"img-005.png: .*unreadable image.*--strict"):
        LabelService(LabelConfig(workers=1, batch_images=1, max_inflight=1), out, dataset,
                     labelkit.BoxLabelerFactory(), "box-prior", "t1", strict=True).run()
    # Images finished before the bad one are kept; the bad one is recorded.
    done = {i for s in read_manifest(out)["shards"] for i in s["image_ids"]}
    assert done == {"im000", "im001", "im002", "im003", "im004"}
    assert [r["image_id"] for r in read_rejects(out) if r["stage"] == "load"] == ["im005"]


@pytest.mark.slow
def test_killed_workers_lose_no_image_and_duplicate_none(cluster, tmp_path):
    root = labelkit.write_folder_dataset(tmp_path / "data", n=16)
    events, pids = [], []

    def progress(event):
        events.append(event)
        if len(events) == 1:      # killed with restart allowed: Ray restarts it, its lost batches are redone
            actor = ray.get_actor("label-worker-0", namespace=NAMESPACE)
            pids.append(ray.get(actor.ready.remote())["pid"])
            ray.kill(actor, no_restart=False)
        if len(events) == 3:      # killed for good: the other worker finishes the run
            ray.kill(ray.get_actor("label-worker-1", namespace=NAMESPACE), no_restart=True)

    summary = service(tmp_path / "out", root, labelkit.BoxLabelerFactory(delay=0.1), batch_images=1).run(progress)
    assert_exactly_once(tmp_path / "out", labelkit.FolderDataset(str(root)))
    assert summary.images_labeled == 16 and summary.rejects == 0
    # Worker 0 came back in a new process and worked on; worker 1 never answered again.
    assert [s["index"] for s in summary.worker_stats] == [0]
    assert summary.worker_stats[0]["pid"] != pids[0] and summary.worker_stats[0]["images"] > 0
    assert read_rejects(tmp_path / "out") == [{"image_id": None, "file": "bad.png", "reason": "box has x2 <= x1",
                                               "stage": "dataset"}]


@pytest.mark.slow
def test_an_image_that_kills_its_worker_is_rejected_and_reaches_the_progress_callback(cluster, tmp_path):
    root = labelkit.write_folder_dataset(tmp_path / "data", n=8)
    out, events = tmp_path / "out", []
    summary = service(out, root, labelkit.BoxLabelerFactory(die_on=("im003",)), max_task_retries=0,
                      max_restarts=5, max_attempts=2).run(events.append)
    assert_exactly_once(out, labelkit.FolderDataset(str(root)), rejected=("im003",))
    assert [r for r in read_rejects(out) if r["stage"] == "label"] == [
        {"image_id": "im003", "file": "img-003.png", "stage": "label",
         "reason": "lost 2 times while labeling it (last time: its label worker died)"}]
    assert (summary.images_labeled, summary.rejects, summary.dataset_rejects) == (7, 1, 1)
    assert sum(e["images"] + e["rejects"] for e in events) == 8        # the progress bar reaches its total


@pytest.mark.slow
def test_the_scheduler_hands_each_image_once_to_the_sink_it_is_given(cluster, tmp_path):
    """The scheduler alone, with a recording sink and no shard writer: every image reaches the sink once, as
    rows, a reject, or lost (im003 kills each worker that takes it)."""
    from pipeline.label_service import LabelWorker, Scheduler

    class Recording:
        def __init__(self):
            self.labeled, self.rejected, self.lost_ = [], [], []

        def finished(self, image_id):
            return image_id in self.labeled or image_id in self.rejected

        def add(self, results, worker, keep_rejects=True):
            for res in results:
                if "table" in res and not self.finished(res["image_id"]):
                    self.labeled.append(res["image_id"])
                elif "table" not in res and keep_rejects:
                    self.rejected.append(res["image_id"])

        def lost(self, sample, attempts, why, worker):
            self.lost_.append((sample.image_id, attempts, why))

    dataset = labelkit.FolderDataset(str(labelkit.write_folder_dataset(tmp_path / "data", n=8, corrupt=(5,))))
    remote = ray.remote(LabelWorker).options(num_cpus=1, max_restarts=5, max_task_retries=0)
    workers = [remote.remote(i, {24: "person", 26: "car"}, labelkit.BoxLabelerFactory(die_on=("im003",)), 0,
                             "box-prior", "cpu") for i in range(2)]
    try:
        sink = Recording()
        scheduler = Scheduler(workers, LabelConfig(batch_images=2, max_attempts=2), list(dataset), sink)
        scheduler.run()
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)
    assert sorted(sink.labeled) == sorted({s.image_id for s in dataset} - {"im003", "im005"})
    assert sink.rejected == ["im005"]
    assert sink.lost_ == [("im003", 2, "its label worker died")]
    assert scheduler.batches_timed_out == 0 and not scheduler.hung()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1])
def test_a_hung_worker_does_not_stall_the_run(cluster, tmp_path, caplog, workers):
    """im003 hangs the first worker that labels it for a minute. With 2 workers its batch (and the one queued
    behind it) goes to the other worker; with 1 the driver restarts the hung worker. The run ends long
    before the minute, every image labeled once."""
    root = labelkit.write_folder_dataset(tmp_path / "data", n=10)
    (tmp_path / "flags").mkdir()
    labeler = labelkit.BoxLabelerFactory(hang_on=("im003",), hang_s=60.0, once_dir=str(tmp_path / "flags"))
    caplog.set_level(logging.WARNING, logger="pipeline.label_service")
    t0 = time.monotonic()
    summary = service(tmp_path / "out", root, labeler, workers=workers, batch_timeout_s=2.0).run()
    assert time.monotonic() - t0 < 45
    assert (tmp_path / "flags" / "im003.hung").exists()            # it did hang
    assert_exactly_once(tmp_path / "out", labelkit.FolderDataset(str(root)))
    assert (summary.images_labeled, summary.rejects) == (10, 0) and summary.batches_timed_out >= 1
    assert "not back after" in caplog.text and "(label.batch_timeout_s); re-issuing" in caplog.text
    if workers == 1:
        assert "label-worker-0 is stuck and no other worker is free: restarting it" in caplog.text
    else:                                                         # the hung worker is not asked for stats
        assert len(summary.worker_stats) == 1


@pytest.mark.slow
def test_retry_rejects_labels_earlier_rejects_again(cluster, tmp_path):
    import cv2

    root = labelkit.write_folder_dataset(tmp_path / "data", n=6, corrupt=(2,))
    out = tmp_path / "out"
    first = service(out, root, labelkit.BoxLabelerFactory(fail_on=("im004",)), workers=1).run()
    assert (first.images_labeled, first.rejects) == (4, 2)
    cv2.imwrite(str(root / "img-002.png"), np.zeros((48, 64, 3), np.uint8))     # the unreadable file is fixed
    plain = service(out, root, workers=1).run()
    assert (plain.images_labeled, plain.images_skipped) == (0, 6)                # rejects count as finished
    # Retried: im002 is labeled now; the teacher still fails on im004, which is recorded again, once.
    second = service(out, root, labelkit.BoxLabelerFactory(fail_on=("im004",)), workers=1,
                     retry_rejects=True).run()
    assert (second.images_retried, second.images_labeled, second.rejects, second.images_skipped) == (2, 1, 1, 4)
    assert sorted(((r["image_id"], r["stage"]) for r in read_rejects(out)), key=str) == [
        ("im004", "label"), (None, "dataset")]
    assert_exactly_once(out, labelkit.FolderDataset(str(root)), rejected=("im004",))
    third = service(out, root, workers=1, retry_rejects=True).run()
    assert (third.images_retried, third.images_labeled, third.rejects) == (1, 1, 0)
    assert [r["stage"] for r in read_rejects(out)] == ["dataset"]
    assert_exactly_once(out, labelkit.FolderDataset(str(root)))


def test_label_help_documents_retry_rejects(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["label", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--retry-rejects" in text and "dataset-level rejects stay" in text


# Enough images that the Ctrl-C, sent once one more image is done than the killed run left, still lands while
# some are left: with 8 a killed run that overshot to 5 of 8 left 2 images that finished before the signal.
N_TOY = 12


def cli(out, address, *extra):
    """``pipeline label`` on a tiny toy dataset with the real box-prior teacher (few CRF / refine steps)."""
    return [sys.executable, "-m", "pipeline.cli", "label", "--dataset", "toy", "--out", str(out),
            "--address", address, "--workers", "2", "--config", str(REPO / "configs" / "toy.yaml"),
            "--set", "dataset.toy.size=96x192", "--set", f"dataset.toy.train={N_TOY}", "--set", "dataset.toy.val=0",
            "--set", "teacher.crf.iters=2", "--set", "teacher.refine.steps=2", "--set", "label.batch_images=1",
            "--set", "label.shard_rows=1", *extra]


def finished_images(out) -> set[str]:
    if not (out / "_manifest.json").exists():
        return set()
    return {i for s in read_manifest(out)["shards"] for i in s["image_ids"]}


def interrupt(cmd, env, out, at_least: int, sig: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` until ``out`` holds ``at_least`` finished images, then send ``sig`` to its process group."""
    return interrupt_when(cmd, env, lambda: len(finished_images(out)) >= at_least, sig)


@pytest.mark.slow
def test_driver_killed_then_interrupted_then_resumed_with_the_box_prior_teacher(cluster, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "BOXMASK_CACHE": str(tmp_path / "cache")}
    killed = interrupt(cli(out, cluster), env, out, 2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    done_killed = finished_images(out)
    assert 2 <= len(done_killed) < N_TOY

    # Ctrl-C: the driver stops its workers, keeps the images it had finished and says how to resume.
    ctrl_c = interrupt(cli(out, cluster), env, out, len(done_killed) + 1, signal.SIGINT)
    assert ctrl_c.returncode == 130, ctrl_c.stderr[-3000:]
    assert "interrupted: finished work is kept; re-run the same command to resume" in ctrl_c.stderr
    done_before = finished_images(out)
    assert done_killed < done_before and len(done_before) < N_TOY

    # A different config must not be mixed into these shards.
    bad = subprocess.run(cli(out, cluster, "--set", "teacher.crf.iters=3"), env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "holds shards of another config" in bad.stderr and "--overwrite" in bad.stderr

    again = subprocess.run(cli(out, cluster), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {len(done_before)} images already finished" in again.stdout
    assert f"labeled {N_TOY - len(done_before)} images" in again.stdout

    from pipeline.datasets.cityscapes import CityscapesDataset

    manifest = read_manifest(out)
    assert Path(manifest["meta"]["data_root"]).parent == tmp_path / "cache"
    dataset = CityscapesDataset(manifest["meta"]["data_root"], "train")
    listed = collections.Counter(i for s in manifest["shards"] for i in s["image_ids"])
    assert set(listed) == {s.image_id for s in dataset} and set(listed.values()) == {1}
    rows = all_rows(out)
    keys = collections.Counter((r["image_id"], r["instance_id"]) for r in rows)
    assert set(keys.values()) == {1}
    assert set(keys) == {(s.image_id, int(k)) for s in dataset for k in s.instance_ids}
    assert {r["teacher"] for r in rows} == {"box-prior"} and {r["round"] for r in rows} == {0}
    assert manifest["meta"]["dataset"] == "toy" and not read_rejects(out)
    by_id = {s.image_id: s for s in dataset}
    for r in rows:
        mask = decode_rle(r["mask_rle"], r["height"], r["width"])
        x1, y1, x2, y2 = by_id[r["image_id"]].boxes[r["instance_id"]]
        outside = np.ones_like(mask)
        outside[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = False
        assert not (mask & outside).any()                # teacher masks stay inside their box
        assert 0.0 <= r["score"] <= 1.0
