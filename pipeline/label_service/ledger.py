"""The attempt ledger of a Ray Data labeling run: what Ray Data does not keep.

Ray Data's actor pool restarts a label worker that died and runs its batch again, without limit, and it has no
per-batch deadline. So a worker tells the ledger (one small Ray actor per run, owned by the driver) which images it
begins and ends; an image begun but never ended was lost with its worker (it died, or its watchdog ended it after
``label.batch_timeout_s``). Beginning a batch says how often its images were lost: a batch with a lost image
goes one image at a time (so an image that kills workers does not take its batch-mates along), and an image lost
``label.max_attempts`` times is rejected instead of labeled. The ledger also gives each pool actor a
stable worker index (by Ray actor id, which a restart keeps) and collects the workers' stats for the summary.
"""
from __future__ import annotations

from typing import Optional

DIED = "its label worker died"


class AttemptLedger:
    """Per-image begin / end records of one run (used as a Ray actor, ``num_cpus=0``)."""

    def __init__(self):
        self.running: dict[str, tuple[int, str]] = {}   # image id -> (worker, why it would be lost)
        self.losses_by_image: dict[str, tuple[int, str]] = {}   # image id -> (times lost, why the last time)
        self.workers: dict[str, int] = {}               # Ray actor id -> worker index
        self.stats_by_worker: dict[int, dict] = {}
        self.timeouts = 0

    def register(self, actor_id: str) -> int:
        """The worker index of a pool actor: the same after Ray restarts it."""
        return self.workers.setdefault(actor_id, len(self.workers))

    def begin(self, image_ids: list[str], worker: int, max_attempts: int) -> dict[str, tuple[int, str]]:
        """``worker`` is to label these images together. Returns, per image lost before, (times lost, why the last
        time): an image begun and never ended was lost with its worker, which counts now, when its batch comes
        back. The images are marked begun only when none was lost before, or when there is one image: a batch
        that lost an image goes one image at a time, each begun on its own. An image lost ``max_attempts`` times is
        never begun again (the worker rejects it; should that batch be lost too, it is rejected again)."""
        lost = {}
        for image_id in image_ids:
            if image_id in self.running:
                _, why = self.running.pop(image_id)
                n, _ = self.losses_by_image.get(image_id, (0, ""))
                self.losses_by_image[image_id] = (n + 1, why)
            if image_id in self.losses_by_image:
                lost[image_id] = self.losses_by_image[image_id]
        if not lost or len(image_ids) == 1:
            for image_id in image_ids:
                if lost.get(image_id, (0, ""))[0] < max_attempts:
                    self.running[image_id] = (worker, DIED)
        return lost

    def end(self, image_ids: list[str], worker: int = -1, stats: Optional[dict] = None) -> None:
        """These images are labeled or rejected (their result is on its way to the driver); ``stats``: the worker's
        stats after them (``report``)."""
        for image_id in image_ids:
            self.running.pop(image_id, None)
            self.losses_by_image.pop(image_id, None)
        if stats is not None:
            self.report(worker, stats)

    def timed_out(self, worker: int, why: str) -> int:
        """``worker``'s watchdog is about to end it: its running images are lost for ``why``; returns how many."""
        hit = [i for i, (w, _) in self.running.items() if w == worker]
        for image_id in hit:
            self.running[image_id] = (worker, why)
        self.timeouts += 1
        return len(hit)

    def report(self, worker: int, stats: dict) -> None:
        self.stats_by_worker[worker] = stats

    def summary(self) -> dict:
        """{"workers": stats per worker (by index), "timeouts": batches ended by a watchdog}."""
        return {"workers": [self.stats_by_worker[i] for i in sorted(self.stats_by_worker)],
                "timeouts": self.timeouts}
