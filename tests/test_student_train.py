"""Training the student: loss goes down, DDP replicas agree, resume is exact, a killed worker is restarted from
the last checkpoint, a NaN stops the run naming the term, and the commands fail in one line (issue 9)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.commands.common import config_path_for
from pipeline.config import RunConfig, load_config
from pipeline.label_service import init_ray
from pipeline.training import build_job
from student.data import TrainImages, collate
from student.model import build_model
from student.train import TRAIN_LOG, NonFiniteLoss, fit, latest_checkpoint, stretch_schedule

ray = pytest.importorskip("ray")

TINY = ["student.backbone=small", "student.fpn_channels=32", "student.box_head_dim=64", "student.rpn_proposals=100",
        "student.rois_per_image=32", "student.mask_rois_per_image=8", "student.mask_size=16",
        "student.min_size=[128]", "student.test_size=128", "student.workers=1", "student.batch_size=2",
        "student.log_every=1", "student.checkpoint_every=2", "student.warmup_iters=2", "student.max_failures=1",
        "dataset.toy.size=128x256", "dataset.toy.train=4", "dataset.toy.val=2", "student.objectives.warmup_iters=0"]


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BOXMASK_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def tiny_config(*extra: str):
    return load_config(config_path_for("toy"), [*TINY, *extra])


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]


def losses_by_iteration(out: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in log_records(out) if "loss" in r}


def test_a_short_training_run_lowers_the_total_loss(toy_cache, tmp_path):
    cfg = tiny_config("student.flip=0", "student.lr=0.01")
    job = build_job(cfg, str(tmp_path))
    torch.manual_seed(0)
    random.seed(0)
    model = build_model(cfg.student, len(job.classes)).train()
    data = TrainImages(job.samples[:2], [c["id"] for c in job.classes], cfg.student)
    images, targets = collate([data[0], data[1]])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(25):
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert np.mean(totals[-5:]) < 0.7 * np.mean(totals[:5]), totals


@pytest.fixture(scope="module")
def cluster(toy_cache):
    if ray.is_initialized():
        ray.shutdown()
    init_ray(RunConfig())
    yield
    ray.shutdown()


def test_every_rank_gets_the_same_short_side_per_step_and_all_sizes_occur():
    from torch.utils.data import DistributedSampler

    from student.train import _batches
    data = list(range(40))
    sizes = [224, 256, 288]
    ranks = [_batches(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True),
                      epoch=3, batch=2, sizes=sizes, seed=0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 10
    for b0, b1 in zip(*ranks):
        assert len({short for _, short in b0 + b1}) == 1
    assert {i for b in ranks[0] + ranks[1] for i, _ in b} == set(data)
    shorts = [b[0][1] for epoch in range(3, 8)
              for b in _batches(DistributedSampler(data, 2, 0, seed=0, drop_last=True), epoch, 2, sizes, 0)]
    assert set(shorts) == set(sizes)
    again = _batches(DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0, drop_last=True),
                     epoch=3, batch=2, sizes=sizes, seed=0)
    assert again == ranks[0]


@pytest.mark.slow
def test_two_ddp_workers_hold_identical_parameters(cluster, tmp_path):
    cfg = tiny_config("student.workers=2", "student.iterations=3")
    result = fit(build_job(cfg, str(tmp_path)))
    digests = [json.loads((tmp_path / "replicas" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["iteration"] == digests[1]["iteration"] == 3
    assert digests[0]["parameters"] == digests[1]["parameters"]
    assert digests[0]["niceness"] == digests[1]["niceness"] == 0  # not Ray's default 15 (student.train.fit)
    assert Path(result["teacher"]).exists()


@pytest.mark.slow
def test_resume_continues_at_the_saved_iteration_with_the_same_losses(cluster, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    fit(build_job(tiny_config("student.iterations=4"), str(straight)))
    fit(build_job(tiny_config("student.iterations=2"), str(split)))
    assert json.loads((latest_checkpoint(split) / "meta.json").read_text())["iteration"] == 2
    fit(build_job(tiny_config("student.iterations=4"), str(split)), resume=True)
    a, b = losses_by_iteration(straight), losses_by_iteration(split)
    assert sorted(b) == [1, 2, 3, 4]                      # the resumed run logged 3 and 4 only
    for it in (3, 4):
        assert b[it] == pytest.approx(a[it], rel=1e-5), (it, a, b)
    state = torch.load(latest_checkpoint(split) / "state.pt", weights_only=True)
    assert state["iteration"] == 4 and state["ema"]["updates"] == 4


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_last_checkpoint(cluster, tmp_path):
    job = build_job(tiny_config("student.iterations=5"), str(tmp_path))
    job.fault = {"kill_at": 3, "marker": str(tmp_path / "killed")}
    result = fit(job)
    assert (tmp_path / "killed").exists() and Path(result["teacher"]).exists()
    iterations = [r["iteration"] for r in log_records(tmp_path)]
    # Killed after logging step 3, restarted from the checkpoint of step 2 (not from scratch): 3 again, then 4, 5.
    assert iterations == [1, 2, 3, 3, 4, 5]


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_term_and_keeps_the_checkpoint(cluster, tmp_path):
    job = build_job(tiny_config("student.iterations=6"), str(tmp_path))
    job.fault = {"nan_at": 3, "term": "loss_color"}
    with pytest.raises(NonFiniteLoss) as exc:
        fit(job)
    assert "loss_color at iteration 3" in str(exc.value) and "\n" not in str(exc.value)
    assert json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())["iteration"] == 2
    assert not (tmp_path / "teacher.pt").exists()


def test_train_and_eval_commands_fail_in_one_line(toy_cache, tmp_path, capsys):
    rc = main(["train", "--dataset", "toy", "--labels", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
               *[a for kv in TINY for a in ("--set", kv)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope" in err[0] and "_manifest.json" in err[0]
    rc = main(["train", "--dataset", "toy", "--out", str(tmp_path / "o"), "--set", "student.projection=mil",
               *[a for kv in TINY for a in ("--set", kv)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "student.projection" in err[0] and "'mil'" in err[0]
    rc = main(["train", "--dataset", "toy", "--out", str(tmp_path / "o"), "--workers", "0"])
    assert rc == 2 and "--workers" in capsys.readouterr().err
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = main(["eval", "--dataset", "toy", "--checkpoint", str(bad), *[a for kv in TINY for a in ("--set", kv)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(bad) in err[0]


def test_eval_reports_mask_box_and_box_as_mask_ap_and_writes_predictions(toy_cache, tmp_path, capsys):
    from student.checkpoint import export

    cfg = tiny_config("student.score_thresh=0.0")
    job = build_job(cfg, str(tmp_path))
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    export(path, build_model(cfg.student, len(job.classes)).state_dict(), cfg.student, job.classes, 0, "toy", "teacher")
    preds = tmp_path / "preds.json"
    rc = main(["eval", "--dataset", "toy", "--checkpoint", str(path), "--out", str(preds), "--json",
               str(tmp_path / "figures.json"), *[a for kv in TINY for a in ("--set", kv)]])
    out = capsys.readouterr().out
    assert rc == 0
    for row in ("mask", "box", "box-as-mask", "person", "AP50"):
        assert row in out
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert set(figures) == {"mask", "box", "box-as-mask"} and figures["mask"]["num_images"] == 2
    records = json.loads(preds.read_text())
    assert records and {"image_id", "category_id", "score", "bbox", "segmentation"} <= set(records[0])
    assert {r["category_id"] for r in records} <= {c["id"] for c in job.classes}


def test_a_longer_run_keeps_its_lr_steps_and_affinity_warm_up_at_the_same_fractions():
    cfg = tiny_config("student.iterations=300", "student.steps=[240]", "student.objectives.warmup_iters=250",
                      "student.warmup_iters=50", "student.ema_ramp=50").student
    long = stretch_schedule(cfg, 900)
    assert (long.iterations, long.steps, long.objectives.warmup_iters) == (900, [720], 750)
    assert (long.warmup_iters, long.ema_ramp) == (50, 50)       # start-up warm-ups are not about the run's length
    assert (cfg.iterations, cfg.steps, cfg.objectives.warmup_iters) == (300, [240], 250)   # cfg untouched
    kept = stretch_schedule(cfg, 900, keep=["steps"])
    assert (kept.steps, kept.objectives.warmup_iters) == ([240], 750)
    assert stretch_schedule(cfg, 300) is cfg


def test_train_iterations_flag_stretches_the_schedule_unless_set(toy_cache, tmp_path, monkeypatch):
    import pipeline.commands.train as train_command
    seen = []
    monkeypatch.setattr(train_command, "connect_ray", lambda cfg, address: None)
    monkeypatch.setattr(train_command, "run_training", lambda job, resume: seen.append(job.cfg) or
                        {"student": "s", "teacher": "t"})
    # The toy config's schedule: 300 iterations, lr step at 240, affinity warm-up 250.
    base = ["train", "--dataset", "toy", "--out", str(tmp_path / "o"), "--set", "dataset.toy.train=4",
            "--set", "dataset.toy.size=128x256"]
    assert main([*base, "--iterations", "900"]) == 0
    assert main([*base, "--set", "student.steps=[100]", "--iterations", "900"]) == 0
    assert main([*base, "--set", "student.iterations=900"]) == 0
    assert [(c.iterations, c.steps, c.objectives.warmup_iters) for c in seen] == [
        (900, [720], 750), (900, [100], 750), (900, [240], 250)]
