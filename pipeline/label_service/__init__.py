"""The pseudo-label service: a driver that hands image batches to ``LabelWorker`` Ray actors and streams
their rows into Parquet shards (``pipeline.shards``), exactly once across interruptions.

One module per concept:

- ``cluster``: connecting to Ray, and how many workers (and GPU shares) the cluster fits;
- ``checkpoint``: loading a teacher checkpoint safely, and the picklable factory that builds a worker's teacher;
- ``digest``: the resume digest, from the dataset's own fingerprint and the teacher;
- ``rows``: one image's labels as shard rows;
- ``worker``: the ``LabelWorker`` actor (a teacher, its metrics and the instance ids its bank refers to);
- ``scheduler``: batches to workers, timeouts, re-queues and rejects, results to a given sink;
- ``service``: ``LabelService``, one run into a shard directory (the shard sink, start and stop of workers);
- ``streaming``: a run over a dataset index (``pipeline.index``) as a Ray Data pipeline, the driver holding no
  dataset; ``ledger``: what Ray Data does not keep for it (how often each image was lost).

The driver holds the dataset and sends the ``Sample`` objects themselves (boxes, ids and picklable image /
depth loaders; the pixels are read in the worker) in each batch; a worker builds only its teacher, from a
picklable factory (constructor injection: tests pass simple labelers, the CLI passes ``TeacherFactory``), and
gets the category names. So a worker holds no per-dataset index: its memory does not grow with the dataset, and
it starts without reading the annotations. Encoded rows come back.

Memory: the driver holds the dataset's samples, at most one shard of encoded rows and the batches in flight;
masks are RLE-encoded in the workers.
"""
from .checkpoint import TeacherFactory, check_network_classes, load_checkpoint
from .cluster import NAMESPACE, actor_name, init_ray, resolve_device, resolve_gpus_per_worker, resolve_workers
from .digest import label_digest
from .rows import sample_rows
from .scheduler import ResultSink, Scheduler
from .service import LabelService, LabelSummary, ShardSink
from .worker import LabelWorker, label_images, load_sample

__all__ = ["NAMESPACE", "LabelService", "LabelSummary", "LabelWorker", "ResultSink", "Scheduler", "ShardSink",
           "TeacherFactory", "actor_name", "check_network_classes", "init_ray", "label_digest", "label_images",
           "load_checkpoint", "load_sample", "resolve_device", "resolve_gpus_per_worker", "resolve_workers",
           "sample_rows"]
