"""Training the student: loss goes down, DDP replicas agree, resume is exact and refuses another config, a killed
worker is restarted by Ray Train from the last checkpoint to the same weights, a NaN stops the run naming the term,
the loop's hooks run in order, and the commands fail in one line."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from boxmask_common.errors import UserError
from pipeline.cli import main
from pipeline.commands.common import config_path_for
from pipeline.config import RunConfig, load_config
from pipeline.label_service import init_ray
from pipeline.training import build_job
from student.data import TrainImages, collate
from student.feature_queue import FeatureQueue
from student.hooks import AffinityWarmup, NaNGuard
from student.loop import HookBase, Trainer
from student.model import build_model
from student.schedule import loss_scales, stretch_schedule
from student.train import RUN_NAME, NonFiniteLoss, fit, latest_checkpoint
from student.train_state import SNAPSHOT_FILE, unreadable_snapshot

ray = pytest.importorskip("ray")
import train_hooks  # noqa: E402  (tests/: hooks only tests install)

ray.cloudpickle.register_pickle_by_value(train_hooks)  # Ray workers do not import tests/

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


def losses_by_iteration(result: dict) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in result["history"]}


def exported_weights(result: dict, name: str = "teacher") -> dict[str, torch.Tensor]:
    return torch.load(result[name], weights_only=True)["state_dict"]


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


class _Quadratic(torch.nn.Module):
    """Two loss terms of one weight: loss_a = 2 w, loss_color = w^2."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        return {"loss_a": 2 * self.w.sum(), "loss_color": (self.w ** 2).sum()}


class _Record(HookBase):
    def __init__(self, events: list):
        self.events = events

    def _log(self, stage: str) -> None:
        t = self.trainer
        self.events.append((stage, t.iter, {k: round(float(v.detach()), 4) for k, v in t.losses.items()}))

    def before_train(self): self._log("before_train")
    def before_step(self): self._log("before_step")
    def after_forward(self): self._log("after_forward")
    def after_backward(self): self._log("after_backward")
    def after_step(self): self._log("after_step")
    def after_train(self): self._log("after_train")


def _quadratic_trainer(hooks, start=1, end=3):
    model = _Quadratic()
    batches = lambda start: iter(lambda: ([torch.zeros(3, 4, 4)], [{}]), None)  # noqa: E731 - endless batches
    return model, Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, hooks, start_iter=start,
                          max_iter=end, device=torch.device("cpu"))


def test_the_loop_calls_its_hooks_in_order_with_the_step_and_the_warmed_up_terms():
    cfg = tiny_config("student.objectives.warmup_iters=4").student
    events: list = []
    model, trainer = _quadratic_trainer([AffinityWarmup(cfg), _Record(events)])
    assert trainer.train() == 3                                   # steps 1 and 2 (a resumed run from step 1)
    stages = [(stage, it) for stage, it, _ in events]
    assert stages == [("before_train", 1), ("before_step", 1), ("after_forward", 1), ("after_backward", 1),
                      ("after_step", 2), ("before_step", 2), ("after_forward", 2), ("after_backward", 2),
                      ("after_step", 3), ("after_train", 3)]
    # The colour term is scaled by the warm-up of the step it is taken at (1/4, then 2/4); the other term is not.
    forward = [losses for stage, _, losses in events if stage == "after_forward"]
    assert loss_scales(1, cfg)["loss_color"] == 0.25 and forward[0] == {"loss_a": 2.0, "loss_color": 0.25}
    w = 1 - 0.1 * (2 + 0.25 * 2)                                  # one SGD step on 2w + w^2 / 4
    assert forward[1] == {"loss_a": round(2 * w, 4), "loss_color": round(0.5 * w * w, 4)}


def test_the_nan_guard_stops_before_the_optimizer_steps_naming_the_term(tmp_path):
    import train_hooks

    events: list = []
    model, trainer = _quadratic_trainer([train_hooks.InjectNaN(at=2, term="loss_color"), NaNGuard(str(tmp_path)),
                                         _Record(events)], start=0, end=5)
    with pytest.raises(NonFiniteLoss) as err:
        trainer.train()
    assert str(err.value) == (f"{tmp_path}: non-finite loss loss_color at iteration 2; the last good checkpoint is "
                              f"kept (--resume continues from it)")
    assert trainer.iter == 2 and events[-1][0] == "after_forward"     # no backward hook, no step, no after_train
    assert torch.isfinite(model.w).all()


def test_the_feature_queue_sees_a_steps_features_only_once_they_are_committed():
    q = FeatureQueue(2)
    q.push(("a", 0), torch.zeros(1, 4))
    q.stage(("b", 1), torch.ones(1, 4))
    q.stage(("c", 2), torch.full((1, 4), 2.0))
    assert len(q) == 1 and q.get(("b", 1)) is None
    q.commit()
    assert len(q) == 2 and ("a", 0) not in q and float(q.get(("c", 2))[0, 0]) == 2.0   # FIFO past the capacity
    q.commit()
    assert len(q) == 2


@pytest.fixture(scope="module")
def cluster(toy_cache):
    if ray.is_initialized():
        ray.shutdown()
    init_ray(RunConfig())
    yield
    ray.shutdown()


def test_every_rank_gets_the_same_short_side_per_step_and_all_sizes_occur():
    from torch.utils.data import DistributedSampler

    from student.data import epoch_batches
    data = list(range(40))
    sizes = [224, 256, 288]
    ranks = [epoch_batches(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True),
                      epoch=3, batch=2, sizes=sizes, seed=0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 10
    for b0, b1 in zip(*ranks):
        assert len({short for _, short in b0 + b1}) == 1
    assert {i for b in ranks[0] + ranks[1] for i, _ in b} == set(data)
    shorts = [b[0][1] for epoch in range(3, 8)
              for b in epoch_batches(DistributedSampler(data, 2, 0, seed=0, drop_last=True), epoch, 2, sizes, 0)]
    assert set(shorts) == set(sizes)
    again = epoch_batches(DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0, drop_last=True),
                     epoch=3, batch=2, sizes=sizes, seed=0)
    assert again == ranks[0]


@pytest.mark.slow
def test_two_ddp_workers_hold_identical_parameters(cluster, tmp_path):
    cfg = tiny_config("student.workers=2", "student.iterations=3")
    job = build_job(cfg, str(tmp_path))
    job.hooks = [train_hooks.ReplicaDigest(str(tmp_path))]
    result = fit(job)
    digests = [json.loads((tmp_path / "replicas" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["iteration"] == digests[1]["iteration"] == 3
    assert digests[0]["parameters"] == digests[1]["parameters"]
    assert digests[0]["niceness"] == digests[1]["niceness"] == 0  # not Ray's default 15 (student.train.fit)
    assert Path(result["teacher"]).exists() and result["iteration"] == 3


@pytest.mark.slow
def test_resume_continues_at_the_saved_iteration_with_the_same_losses(cluster, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    a = fit(build_job(tiny_config("student.iterations=4"), str(straight)))
    first = fit(build_job(tiny_config("student.iterations=2"), str(split)))
    assert first["iteration"] == 2 and first["metrics"]["iteration"] == 2      # fit returns the step reached
    assert json.loads((latest_checkpoint(split) / "meta.json").read_text())["iteration"] == 2
    b = fit(build_job(tiny_config("student.iterations=4"), str(split)), resume=True)
    assert b["iteration"] == 4
    # The driver's metrics are Ray's Result: the last report, equal to the last record the progress relay passed on.
    assert b["metrics"]["iteration"] == 4 and b["metrics"]["loss"] == b["history"][-1]["loss"]
    la, lb = losses_by_iteration(a), losses_by_iteration(b)
    assert sorted(lb) == [3, 4]                                             # the resumed run took 3 and 4 only
    for it in (3, 4):
        assert lb[it] == pytest.approx(la[it], rel=1e-5), (it, la, lb)
    state = torch.load(latest_checkpoint(split) / "state.pt", weights_only=True)
    assert state["iteration"] == 4 and state["ema"]["updates"] == 4
    for k, v in exported_weights(a).items():
        assert torch.allclose(v.float(), exported_weights(b)[k].float(), atol=1e-5), k


def test_a_cut_ray_snapshot_falls_back_to_the_newest_complete_checkpoint_folder(tmp_path):
    run = tmp_path / RUN_NAME
    for name, meta, state in [("checkpoint_a", {"iteration": 2}, True), ("checkpoint_b", {"iteration": 4}, True),
                              ("checkpoint_c", None, False),                 # created, nothing copied in yet
                              ("checkpoint_d", "{\"iterat", True),           # meta.json cut
                              ("checkpoint_e", {"iteration": 6}, False)]:    # state.pt not there yet
        (run / name).mkdir(parents=True)
        if meta is not None:
            (run / name / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        if state:
            (run / name / "state.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) is None and unreadable_snapshot(tmp_path) is None   # no snapshot: nothing
    snapshot = run / SNAPSHOT_FILE
    for cut in ("", '{"checkpoint_results": [{"check'):
        snapshot.write_text(cut)
        assert unreadable_snapshot(tmp_path) == snapshot
        assert latest_checkpoint(tmp_path) == run / "checkpoint_b"


@pytest.mark.slow
def test_a_run_stopped_while_ray_wrote_its_snapshot_resumes_from_the_folder(cluster, tmp_path, caplog):
    fit(build_job(tiny_config("student.iterations=2"), str(tmp_path)))
    snapshot = tmp_path / RUN_NAME / SNAPSHOT_FILE
    snapshot.write_text(snapshot.read_text()[:40])
    resumed = fit(build_job(tiny_config("student.iterations=4"), str(tmp_path)), resume=True)
    assert resumed["iteration"] == 4 and sorted(losses_by_iteration(resumed)) == [3, 4]
    assert (snapshot.parent / (SNAPSHOT_FILE + ".unreadable")).is_file() and unreadable_snapshot(tmp_path) is None
    assert "was cut when the run stopped" in caplog.text
    assert json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())["iteration"] == 4


@pytest.mark.slow
def test_a_resume_under_another_config_is_refused_with_nothing_written(cluster, tmp_path):
    fit(build_job(tiny_config("student.iterations=2"), str(tmp_path)))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(UserError) as err:
        fit(build_job(tiny_config("student.iterations=4", "student.lr=0.02", "student.alpha_con=0.5"),
                      str(tmp_path)), resume=True)
    text = str(err.value)
    assert "differing keys: student.alpha_con, student.lr" in text and "\n" not in text, text
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    # Without --resume an earlier run's checkpoints are not silently replaced either.
    with pytest.raises(UserError, match="holds the checkpoints of an earlier run: --resume continues it"):
        fit(build_job(tiny_config("student.iterations=2"), str(tmp_path)))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.slow
def test_a_killed_worker_restarts_through_ray_train_to_the_same_weights(cluster, tmp_path):
    straight = fit(build_job(tiny_config("student.iterations=5"), str(tmp_path / "straight")))
    job = build_job(tiny_config("student.iterations=5"), str(tmp_path / "killed"))
    job.hooks = [train_hooks.KillOnce(at=3, marker=str(tmp_path / "killed.marker"))]
    result = fit(job)
    assert (tmp_path / "killed.marker").exists() and result["iteration"] == 5
    iterations = [r["iteration"] for r in result["history"]]
    # Restarted from the checkpoint of step 2, not from scratch: step 1 ran once, steps 3 to 5 after the restart.
    assert iterations.count(1) == 1 and iterations[-3:] == [3, 4, 5], iterations
    for name in ("student", "teacher"):
        want, got = exported_weights(straight, name), exported_weights(result, name)
        assert all(torch.equal(want[k], got[k]) for k in want), name


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_term_and_keeps_the_checkpoint(cluster, tmp_path):
    job = build_job(tiny_config("student.iterations=6"), str(tmp_path))
    job.hooks = [train_hooks.InjectNaN(at=3, term="loss_color")]
    with pytest.raises(NonFiniteLoss) as exc:
        fit(job)
    text = str(exc.value)
    assert text.startswith(f"{tmp_path}: non-finite loss loss_color at iteration 3") and "\n" not in text, text
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
    import pipeline.training
    seen = []
    monkeypatch.setattr(train_command, "connect_ray", lambda cfg, address: None)
    # The command imports run_training when it runs (it keeps torch out of `pipeline --help`): patch its home.
    monkeypatch.setattr(pipeline.training, "run_training", lambda job, resume: seen.append(job.cfg) or
                        {"student": "s", "teacher": "t", "iteration": 1, "metrics": {"loss": 1.0}})
    # The toy config's schedule: 300 iterations, lr step at 240, affinity warm-up 250.
    base = ["train", "--dataset", "toy", "--out", str(tmp_path / "o"), "--set", "dataset.toy.train=4",
            "--set", "dataset.toy.size=128x256"]
    assert main([*base, "--iterations", "900"]) == 0
    assert main([*base, "--set", "student.steps=[100]", "--iterations", "900"]) == 0
    assert main([*base, "--set", "student.iterations=900"]) == 0
    assert [(c.iterations, c.steps, c.objectives.warmup_iters) for c in seen] == [
        (900, [720], 750), (900, [100], 750), (900, [240], 250)]


def test_no_student_function_is_longer_than_sixty_lines():
    """The loop is run_step plus hooks; a function that grows past 60 lines is a sign it took on a hook's job."""
    import ast

    root = Path(__file__).resolve().parents[1] / "student"
    long = [f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p in sorted(root.glob("*.py"))
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
