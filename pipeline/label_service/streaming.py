"""Labeling as a Ray Data pipeline over the dataset index (``pipeline.index``).

``ray.data.read_parquet`` streams the index's parts; the images a shard directory already finished are dropped;
blocks of ``label.batch_images`` rows go to an actor pool of ``LabelBatches`` (one teacher each, CPU or GPU as the
config says); the driver iterates their results and commits them through its ``ShardWriter`` (``service``), which
keeps them exactly once. The driver never holds the index: only one block of results at a time, and the set of
finished image ids.

What Ray Data gives is used as it is: reading in parts, back-pressure, the actor pool (its actors are on the
dashboard as ``MapWorker(MapBatches(LabelBatches))``, with the Data view of the run), restarting a dead actor and
running its batch again. What it does not give is kept here, and only that:

- a per-batch deadline: a watchdog thread in each worker ends its process when a batch runs past
  ``label.batch_timeout_s`` (Ray then restarts it and runs the batch again);
- a limit on the times an image is lost: Ray retries a lost batch without limit, so an image that kills or hangs
  its worker would come back forever. The ``ledger`` counts the losses of each image: an image lost before is
  labeled alone, and one lost ``label.max_attempts`` times is rejected as lost.
"""
from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa

from ..index import INDEX_SCHEMA, IndexSource, table_rows

log = logging.getLogger(__name__)

# One result per image, from the workers to the driver; a batch's results travel as one row of BATCH_SCHEMA.
RESULT_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("worker", pa.int32()),
    ("rows", pa.binary()),         # the image's shard rows as an Arrow IPC stream; null for a reject
    ("empty", pa.string()),        # json {"image_id", "file_name", "height", "width"} of an image without instances
    ("file", pa.string()),         # rejects: file, reason, stage
    ("reason", pa.string()),
    ("stage", pa.string()),
])
# Ray Data cuts a task's output into blocks of ``target_max_block_size`` (about one label batch of index rows, a
# few KB), and a worker stops after two blocks the driver has not taken yet. Results of 10-50 KB an image were a
# block each, and the worker waited about 0.5 s per batch (coco_tiny: 0.55x the in-memory path). A row is never
# cut, so a batch's results as one row are one block.
BATCH_SCHEMA = pa.schema([("results", pa.binary())])   # an Arrow IPC stream of RESULT_SCHEMA rows


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode_results(block: pa.Table) -> list[tuple[int, dict]]:
    """A block of ``BATCH_SCHEMA`` rows -> (worker, result) pairs, results as ``LabelWorker.label_batch`` gives
    them (``{"image_id", "table"[, "empty"]}`` or ``{"image_id", "file", "reason", "stage"}``)."""
    out = []
    records = [rec for packed in block.column("results").to_pylist()
               for rec in pa.ipc.open_stream(packed).read_all().to_pylist()]
    for rec in records:
        if rec["rows"] is not None:
            res = {"image_id": rec["image_id"], "table": pa.ipc.open_stream(rec["rows"]).read_all()}
            if rec["empty"] is not None:
                res["empty"] = json.loads(rec["empty"])
        else:
            res = {k: rec[k] for k in ("image_id", "file", "reason", "stage")}
        out.append((rec["worker"], res))
    return out


class LabelBatches:
    """The Ray Data actor-pool callable: a ``LabelWorker`` (a teacher and its memory bank, metrics) that labels
    blocks of index rows, with the watchdog and ledger bookkeeping of the module docstring.

    ``root``: the dataset root the index's file names are relative to; ``ledger``: the run's ``AttemptLedger``
    actor handle; the other arguments are ``LabelWorker``'s.
    """

    def __init__(self, root: str, ledger: Any, max_attempts: int, batch_timeout_s: float,
                 category_names: dict[int, str], teacher_factory: Callable[[str], Any], round_: int,
                 teacher_id: str, device: str = "auto", threads: int = 1):
        import ray

        from .worker import LabelWorker

        self.root = root
        self.ledger = ledger
        self.max_attempts = max_attempts
        self.batch_timeout_s = batch_timeout_s
        self.index = ray.get(ledger.register.remote(ray.get_runtime_context().get_actor_id()))
        self.worker = LabelWorker(self.index, category_names, teacher_factory, round_, teacher_id, device, threads)
        self._deadline = 0.0          # monotonic time the running batch must end by; 0: none running
        self._batches = 0
        self._call_s = 0.0
        threading.Thread(target=self._watch, name="label-batch-watchdog", daemon=True).start()

    def _watch(self) -> None:
        import ray

        while True:
            time.sleep(0.2)
            deadline = self._deadline
            if deadline and time.monotonic() > deadline:
                why = f"no result within label.batch_timeout_s = {self.batch_timeout_s:g} s"
                try:
                    ray.get(self.ledger.timed_out.remote(self.index, why), timeout=10)
                finally:
                    log.warning("label-worker-%d: batch not back after %.0f s (label.batch_timeout_s); ending this "
                                "worker so that Ray restarts it and redoes the batch", self.index,
                                self.batch_timeout_s)
                    os._exit(1)

    def __call__(self, block: pa.Table) -> pa.Table:
        import ray

        t_call = time.monotonic()
        samples = [row.to_sample(self.root) for row in table_rows(block)]
        ids = [s.image_id for s in samples]
        self._deadline = time.monotonic() + self.batch_timeout_s
        try:
            # One call to the ledger per batch, and one that is not waited for (a caller's calls to an actor run
            # in order); more only after a loss.
            lost = ray.get(self.ledger.begin.remote(ids, self.index, self.max_attempts))
            given_up = [i for i in ids if lost.get(i, (0, ""))[0] >= self.max_attempts]
            results = []
            if not lost:
                results = self.worker.label_batch(self._batches, samples)
                self.ledger.end.remote(ids, self.index, self._stats(t_call))
            else:
                # The images one at a time: the one that kills or hangs its worker is then lost alone, and its
                # batch-mates are labeled.
                for sample in samples:
                    if sample.image_id in given_up:
                        continue
                    if len(samples) > 1:
                        ray.get(self.ledger.begin.remote([sample.image_id], self.index, self.max_attempts))
                    results.extend(self.worker.label_batch(self._batches, [sample]))
                    self.ledger.end.remote([sample.image_id], self.index, self._stats(t_call))
            self._batches += 1
        finally:
            self._deadline = 0.0
        by_id = {r["image_id"]: r for r in results}
        self._call_s += time.monotonic() - t_call
        for image_id in given_up:
            n, why = lost[image_id]
            sample = samples[ids.index(image_id)]
            by_id[image_id] = {"image_id": image_id, "file": sample.file_name, "stage": "label",
                               "reason": f"lost {n} times while labeling it (last time: {why})"}
        return self._encode([by_id[i] for i in ids if i in by_id])

    def _stats(self, t_call: float) -> dict:
        """``LabelWorker.stats`` and ``call_s``: seconds in this callable's calls so far (labeling and what Ray
        Data's batch costs around it: index rows to samples, the ledger, results to Arrow)."""
        return {**self.worker.stats(), "call_s": self._call_s + time.monotonic() - t_call}

    def _encode(self, results: list[dict]) -> pa.Table:
        """One ``BATCH_SCHEMA`` row holding the results as ``RESULT_SCHEMA`` rows."""
        cols = {name: [] for name in RESULT_SCHEMA.names}
        for res in results:
            table = res.get("table")
            cols["image_id"].append(res["image_id"])
            cols["worker"].append(self.index)
            cols["rows"].append(None if table is None else _ipc(table))
            cols["empty"].append(json.dumps(res["empty"]) if "empty" in res else None)
            for key in ("file", "reason", "stage"):
                cols[key].append(res.get(key))
        packed = _ipc(pa.Table.from_pydict(cols, schema=RESULT_SCHEMA))
        return pa.table({"results": [packed]}, schema=BATCH_SCHEMA)


def _drop_finished(block: pa.Table, done: pa.Array) -> pa.Table:
    import pyarrow.compute as pc

    return block.filter(pc.invert(pc.is_in(block.column("image_id"), value_set=done)))


def index_row_bytes(source: IndexSource) -> int:
    """Uncompressed bytes per image of the index's first part (its Parquet metadata; at least 64)."""
    import pyarrow.parquet as pq

    if not source.parts:
        return 64
    meta = pq.read_metadata(source.parts[0])
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return max(64, size // max(1, meta.num_rows))


@contextmanager
def _datasource_v1():
    """Ray Data's first Parquet datasource while a read is planned. The second one lists the files in a task
    that needs a whole CPU, which the label workers of a small machine hold: the run would wait forever."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, False
    try:
        yield
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved


def _not_progress_bar_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_data() -> None:
    """Ray Data's console at warnings: its plan, its read estimates and its notice that the progress bars are off
    (the run has its own) came on every run."""
    logger = logging.getLogger("ray.data")
    logger.setLevel(logging.WARNING)
    for handler in logger.handlers:
        if _not_progress_bar_notice not in handler.filters:
            handler.addFilter(_not_progress_bar_notice)


def label_pipeline(source: IndexSource, done: pa.Array, limit: Optional[int], worker_args: dict, workers: int,
                   batch_images: int, max_inflight: int, cpus_per_worker: float, gpus_per_worker: float):
    """The Ray Data dataset of one run's results (``BATCH_SCHEMA`` blocks, ``decode_results`` reads them): the
    first ``limit`` images of the index (all: None) without those in ``done`` (a string array of image ids),
    ``batch_images`` at a time labeled by ``workers`` ``LabelBatches`` actors (``worker_args`` their constructor's
    keywords, each with the CPUs and GPUs given), results in index order. Ray Data restarts a dead worker and
    redoes its batch without limit; the ledger, not Ray, bounds how often an image is lost.

    Ray runs a map task again after a loss, and a task is a bundle of whole input blocks; its results reach the
    driver when it ends. So the blocks are made about one label batch small (``target_max_block_size``): a lost
    worker costs its batch, and each batch's results commit as soon as it is labeled. Reading and dropping
    finished images take no CPU (the label workers may hold every one), one part at a time in index order.
    """
    import ray
    import ray.data   # its first import sets up its loggers: after it, to keep them

    quiet_ray_data()
    with _datasource_v1():
        ds = ray.data.read_parquet([os.fspath(p) for p in source.parts], columns=list(INDEX_SCHEMA.names),
                                   num_cpus=0, concurrency=1)
    ctx = ds.context
    # One image order for every run: the memory bank makes the labels depend on it.
    ctx.execution_options.preserve_order = True
    with warnings.catch_warnings():
        # Deprecated (Ray Data is to place blocks itself) but still read by Ray 2.60's actor pool: with it on, a
        # free worker may take a later block first, and one worker would not see the images in index order.
        warnings.simplefilter("ignore")
        ctx.execution_options.actor_locality_enabled = False
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = max(1, batch_images) * index_row_bytes(source)
    if limit is not None:
        ds = ds.limit(limit)
    if len(done):
        # As the read, so that the two fuse into one task per part: a zero-CPU operator of its own would have
        # Ray Data start a task, and the raylet a worker process, for every block at once.
        ds = ds.map_batches(_drop_finished, batch_format="pyarrow", batch_size=None, num_cpus=0, concurrency=1,
                            fn_kwargs={"done": done})
    with warnings.catch_warnings():
        # allow_out_of_order_execution has no named parameter: as a remote argument it draws Ray 2.60's notice
        # that those are to go in 2.64, on every run.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(LabelBatches, fn_constructor_kwargs=worker_args, batch_size=max(1, batch_images),
                              batch_format="pyarrow",
                              compute=ray.data.ActorPoolStrategy(size=workers,
                                                                 max_tasks_in_flight_per_actor=max(1, max_inflight)),
                              num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                              # Ray Data lets an actor run a later batch while an earlier one's block is still on
                              # its way; then one worker would not see the images in index order.
                              allow_out_of_order_execution=False)


def iter_results(ds) -> Iterator[tuple[int, dict]]:
    """(worker, result) pairs of a ``label_pipeline`` dataset as its blocks arrive; closing the iterator stops
    the execution."""
    it = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    try:
        for block in it:
            yield from decode_results(block)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
