"""The pseudo-label service: a Ray Data pipeline that streams a dataset index (``pipeline.index``) through
label workers, and a driver that commits their rows into Parquet shards (``pipeline.shards``), exactly once
across interruptions.

One module per concept:

- ``cluster``: connecting to Ray, and how many workers (and GPU shares) the cluster fits;
- ``checkpoint``: loading a teacher checkpoint safely, and the picklable factory that builds a worker's teacher;
- ``digest``: the resume digest, from the dataset's own fingerprint and the teacher;
- ``rows``: one image's labels as shard rows;
- ``worker``: ``LabelWorker``, a teacher with its metrics and the instance ids its bank refers to;
- ``streaming``: the Ray Data pipeline, whose actor-pool callable holds a ``LabelWorker``; ``ledger``: what Ray
  Data does not keep for it (how often each image was lost);
- ``service``: ``LabelService``, one run into a shard directory (the pipeline's results into a shard sink).

A worker builds only its teacher, from a picklable factory (constructor injection: tests pass simple labelers,
the CLI passes ``TeacherFactory``), and gets the category names; the index rows arrive in its batches and the
pixels are read there. So neither the driver nor a worker holds the dataset, and a worker's memory does not grow
with it.

Memory: the driver holds the finished image ids, at most one shard of encoded rows and one block of results;
masks are RLE-encoded in the workers.
"""
from .checkpoint import TeacherFactory, check_network_classes, load_checkpoint
from .cluster import NAMESPACE, init_ray, resolve_device, resolve_gpus_per_worker, resolve_workers
from .digest import label_digest
from .rows import sample_rows
from .service import LabelService, LabelSummary, ShardSink
from .worker import LabelWorker, label_images, load_sample

__all__ = ["NAMESPACE", "LabelService", "LabelSummary", "LabelWorker", "ShardSink",
           "TeacherFactory", "check_network_classes", "init_ray", "label_digest", "label_images",
           "load_checkpoint", "load_sample", "resolve_device", "resolve_gpus_per_worker", "resolve_workers",
           "sample_rows"]
