"""Live training metrics on the driver, from what the workers report (``ray.train.report``): Ray Train's controller
hands every report to ``ProgressRelay.after_report``, which forwards rank 0's metrics through a Ray queue to the
driver, where ``ProgressRelay.run`` passes them to a progress callback while ``trainer.fit`` runs."""
from __future__ import annotations

import threading
from typing import Any, Callable

from ray.train import UserCallback


class ProgressRelay(UserCallback):
    """A ``RunConfig`` callback (it runs in Ray Train's controller) and the driver's end of its queue. A record is
    rank 0's metrics, with ``peak_rss_mb`` the largest of every rank's."""

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        record = dict(metrics[0])
        record["peak_rss_mb"] = max(m.get("peak_rss_mb", 0.0) for m in metrics)  # the largest rank's
        # Fire and forget: the controller must not block on the driver; one caller's calls keep their order.
        self.queue.actor.put_nowait.remote(record)

    def run(self, fit: Callable[[], Any], progress: Callable[[dict], None] | None) -> tuple[Any, list[dict]]:
        """``fit()`` on a thread while the main thread hands each record to ``progress``, in order (so Ctrl-C
        reaches the caller at once); returns (fit's result, every record). ``fit``'s exception is re-raised."""
        from ray.util.queue import Empty

        outcome: dict = {}

        def target() -> None:
            try:
                outcome["result"] = fit()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        history: list[dict] = []
        try:
            while True:
                done = not thread.is_alive()
                try:
                    record = self.queue.get(timeout=0.5)
                except Empty:
                    if done:
                        break
                    continue
                history.append(record)
                if progress is not None:
                    progress(record)
        finally:
            self.queue.shutdown()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"], history
