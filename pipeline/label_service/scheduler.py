"""The scheduler of one labeling run: hands batches of samples to the label workers and each batch's results
to a sink it is given.

The remaining samples are cut into batches of ``label.batch_images``; each live worker has at most
``label.max_inflight`` batches queued, so a slow worker holds back little work and a dead one loses only its
queue. Ray restarts a dead actor (``label.max_restarts``) and re-runs its queued tasks
(``label.max_task_retries``); when Ray gives up on a task the scheduler re-queues its images one per batch on the
other workers. A batch not back ``label.batch_timeout_s`` after its worker began it (a hung worker) is cancelled
with the batches queued behind it; its images are re-queued one per batch for the other workers and the hung
worker gets no new work until it answers (when no other worker is left to take the work, the scheduler restarts
the hung one). An image lost ``label.max_attempts`` times (worker deaths and timeouts) goes to the sink as lost.
A result may arrive twice (a timed-out batch that finished after all): the sink keeps the first.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import LabelConfig
from ..datasets.base import Sample
from ..errors import UserError, one_line
from .cluster import actor_name

log = logging.getLogger(__name__)


class ResultSink(Protocol):
    """Where a scheduler's results go (``service.ShardSink`` writes them to shards)."""

    def finished(self, image_id: str) -> bool:
        """Whether the image is done (labeled, or rejected by this run): its queued copies are dropped."""

    def add(self, results: list[dict], worker: int, keep_rejects: bool = True) -> None:
        """A batch's results from worker ``worker`` (``LabelWorker.label_batch``); ``keep_rejects`` False for a
        batch that timed out, whose failed images were re-queued and whose retry decides."""

    def lost(self, sample: Sample, attempts: int, why: str, worker: int) -> None:
        """``sample`` was lost ``attempts`` (= ``label.max_attempts``) times, the last time on ``worker``."""


@dataclass
class _Flight:
    """A task in flight on worker ``worker``: a batch of samples, or a ``ready`` probe."""

    worker: int
    kind: str                         # "batch" | "probe"
    batch_id: int = -1
    samples: list = field(default_factory=list)
    started: float = 0.0              # when its worker began it, as the driver sees it; 0 while queued
    stale: bool = False               # timed out: cancelled, its images re-queued; only holds its worker


class Scheduler:
    """Hands batches of ``todo`` to the ``workers`` (actor handles of ``LabelWorker``) and their results to
    ``sink`` (module docstring). ``run`` returns once every image is finished or lost."""

    def __init__(self, workers: list, cfg: LabelConfig, todo: list[Sample], sink: ResultSink):
        self.workers = workers
        self.cfg = cfg
        self.sink = sink
        self.batches_timed_out = 0
        size = max(1, self.cfg.batch_images)
        self.queue: deque[list[Sample]] = deque(todo[i:i + size] for i in range(0, len(todo), size))
        self.attempts: dict[str, int] = {}
        self.inflight: dict[Any, _Flight] = {}
        n = len(self.workers)
        self.pending: list[deque] = [deque() for _ in range(n)]   # each worker's live batch refs, issue order
        self.alive = [True] * n
        self.reprobe_at: dict[int, float] = {}   # worker -> when to ask again whether it is back (restarting)
        self.next_batch = 0

    # Per-worker state read off the flights, so it cannot drift from them.
    def _flights(self, i: int) -> list[_Flight]:
        return [f for f in self.inflight.values() if f.worker == i]

    def _load(self, i: int) -> int:
        """Batches in flight on worker ``i``, timed-out ones included."""
        return sum(f.kind == "batch" for f in self._flights(i))

    def _stalled(self, i: int) -> bool:
        """Worker ``i`` is stuck in a timed-out batch: no new work for it."""
        return any(f.stale for f in self._flights(i))

    def _probing(self, i: int) -> bool:
        """Whether worker ``i`` is being asked if it is back: no work for it until it answers."""
        return i in self.reprobe_at or any(f.kind == "probe" for f in self._flights(i))

    def hung(self) -> set[int]:
        """Workers still stuck in a timed-out batch."""
        return {f.worker for f in self.inflight.values() if f.stale}

    def _free(self, i: int) -> bool:
        return self.alive[i] and not self._probing(i) and not self._stalled(i)

    def run(self) -> None:
        import ray

        # Until every image is finished or rejected: the queue is empty and no live batch is out (probes and
        # timed-out batches left over are not waited for).
        while self.queue or any(f.kind == "batch" and not f.stale for f in self.inflight.values()):
            self._reprobe()
            self._issue()
            if not self.inflight and not self.reprobe_at:
                raise UserError("label workers", "all label workers died; finished shards are kept, re-run "
                                                 "the same command to resume")
            if self.queue and not any(self._free(i) or (self.alive[i] and self._probing(i))
                                      for i in range(len(self.workers))):
                self._restart_hung()
            if not self.inflight:             # only restarting workers: ask them again soon
                time.sleep(self._wait_s())
                continue
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self._wait_s())
            for ref in ready:
                flight = self.inflight.pop(ref)
                if flight.kind == "probe":
                    self._on_probe(ref, flight)
                else:
                    self._on_batch(ref, flight)
            self._check_timeouts()

    def _issue(self) -> None:
        for i, actor in enumerate(self.workers):
            while self._free(i) and self._load(i) < self.cfg.max_inflight and self.queue:
                samples = [s for s in self.queue.popleft() if not self.sink.finished(s.image_id)]
                if not samples:
                    continue
                ref = actor.label_batch.remote(self.next_batch, samples)
                started = 0.0 if self.pending[i] else time.monotonic()
                self.inflight[ref] = _Flight(i, "batch", self.next_batch, samples, started)
                self.pending[i].append(ref)
                self.next_batch += 1

    def _probe(self, i: int) -> None:
        """Ask worker ``i`` whether it is back (restarted) or gone for good; no work for it until it answers."""
        if self.alive[i] and not self._probing(i):
            self.inflight[self.workers[i].ready.remote()] = _Flight(i, "probe")

    def _reprobe(self) -> None:
        now = time.monotonic()
        for i, at in list(self.reprobe_at.items()):
            if at <= now:
                del self.reprobe_at[i]
                self.inflight[self.workers[i].ready.remote()] = _Flight(i, "probe")

    def _on_probe(self, ref, flight: _Flight) -> None:
        import ray

        i = flight.worker
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            # Still restarting (a probe is not retried when label.max_task_retries is 0): ask again soon.
            self.reprobe_at[i] = time.monotonic() + 0.5
            return
        except ray.exceptions.RayActorError as exc:
            self.alive[i] = False
            log.warning("%s is gone for good: %s", actor_name(i), one_line(exc, last=True))

    def _on_batch(self, ref, flight: _Flight) -> None:
        import ray

        i = flight.worker
        if flight.stale:
            try:
                results = ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                return
            except ray.exceptions.RayActorError as exc:
                log.warning("%s died in timed-out batch %d: %s", actor_name(i), flight.batch_id,
                            one_line(exc, last=True))
                self._probe(i)
                return
            # Finished before the cancel landed: keep what is new. Its rejects are not recorded, the images
            # went back to the queue and their retry decides.
            self.sink.add(results, i, keep_rejects=False)
            return
        try:
            results = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._worker_died(i, ref, flight, one_line(exc, last=True))
            # Restarting or dead for good? The probe answers once Ray knows.
            self._probe(i)
            return
        self._started_next(i, ref)
        self.sink.add(results, i)

    def _started_next(self, i: int, ref) -> None:
        """Batch ``ref`` of worker ``i`` is back: the next one queued on the worker starts now."""
        pending = self.pending[i]
        if ref in pending:
            pending.remove(ref)
        if pending and self.inflight[pending[0]].started == 0.0:
            self.inflight[pending[0]].started = time.monotonic()

    def _worker_died(self, i: int, ref, flight: _Flight, cause: str) -> None:
        """Ray gave up on batch ``ref`` of worker ``i``. An actor runs its tasks one at a time, in order, so the
        worker died in the first batch of its queue, whichever failure Ray reports first (a batch not timed out is
        always in its worker's queue)."""
        import ray

        refs = list(self.pending[i])
        self.pending[i].clear()
        flights = [flight if r == ref else self.inflight.pop(r) for r in refs]
        for r in refs[1:]:
            ray.cancel(r)                     # a restarted actor would otherwise run it as well
        log.warning("%s lost batch %d (%s) to %s; redoing its images", actor_name(i), flights[0].batch_id,
                    _ids(flights[0].samples), cause)
        self._lost_running(i, flights[0], flights[1:], "its label worker died")

    def _lost_running(self, i: int, running: _Flight, queued: list[_Flight], why: str) -> None:
        """Worker ``i`` lost the batch it was running: its images count a loss (``_requeue``); the batches queued
        behind it never began and go back as they were."""
        for flight in reversed(queued):
            self.queue.appendleft(flight.samples)
        self._requeue(running.samples, why, i)

    def _wait_s(self) -> float:
        """Seconds until the next batch deadline or re-probe (at most 5)."""
        due = [self.inflight[p[0]].started + self.cfg.batch_timeout_s for p in self.pending if p]
        due.extend(self.reprobe_at.values())
        if not due:
            return 5.0
        return min(5.0, max(0.01, min(due) - time.monotonic()))

    def _check_timeouts(self) -> None:
        import ray

        now = time.monotonic()
        for i in range(len(self.workers)):
            if not self.pending[i]:
                continue
            head = self.inflight[self.pending[i][0]]
            if now - head.started < self.cfg.batch_timeout_s:
                continue
            refs = list(self.pending[i])
            self.pending[i].clear()
            queued = [self.inflight[r] for r in refs[1:]]
            behind = f" and the {len(queued)} batch{'es' if len(queued) > 1 else ''} queued behind it" if queued else ""
            log.warning("%s: batch %d (%d images) not back after %.0f s (label.batch_timeout_s); re-issuing its "
                        "images%s to other workers", actor_name(i), head.batch_id, len(head.samples),
                        now - head.started, behind)
            self.batches_timed_out += 1
            for ref in refs:
                ray.cancel(ref)           # a queued batch never runs; the running one stops before its next image
                self.inflight[ref].stale = True
            self._lost_running(i, head, queued,
                               f"no result within label.batch_timeout_s = {self.cfg.batch_timeout_s:g} s")

    def _restart_hung(self) -> None:
        """Work is waiting and every live worker is stuck in a timed-out batch: restart the one stuck longest
        (Ray does not re-run its cancelled batches); the probe says when it is back."""
        import ray

        stuck = [(min(f.started for f in self.inflight.values() if f.stale and f.worker == i), i)
                 for i in range(len(self.workers)) if self.alive[i] and self._stalled(i) and not self._probing(i)]
        if not stuck:
            return
        _, i = min(stuck)
        log.warning("%s is stuck and no other worker is free: restarting it", actor_name(i))
        ray.kill(self.workers[i], no_restart=False)
        # Its cancelled batches die with the process and are not re-run: stop waiting for them.
        for ref in [r for r, f in self.inflight.items() if f.stale and f.worker == i]:
            del self.inflight[ref]
        self._probe(i)

    def _requeue(self, samples: list[Sample], why: str, worker: int) -> None:
        """Samples whose batch was lost: each goes back alone at the head of the queue (so an image that kills
        or hangs workers does not take its batch-mates along), or to the sink as lost once lost
        ``max_attempts`` times."""
        for sample in samples:
            image_id = sample.image_id
            if self.sink.finished(image_id):
                continue
            n = self.attempts[image_id] = self.attempts.get(image_id, 0) + 1
            if n >= self.cfg.max_attempts:
                self.sink.lost(sample, n, why, worker)
            else:
                self.queue.appendleft([sample])


def _ids(samples: list[Sample], most: int = 4) -> str:
    ids = [s.image_id for s in samples[:most]]
    return ", ".join(ids) + (f" and {len(samples) - most} more" if len(samples) > most else "")
