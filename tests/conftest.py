"""Suite-wide setup."""
from __future__ import annotations

import logging
import os
import signal
import sys

import pytest


def pytest_configure(config):
    # Several tests press Ctrl-C (SIGINT) on themselves or on a CLI subprocess. A runner started in the background
    # by a non-interactive shell ignores SIGINT, Python then installs no KeyboardInterrupt handler, and children
    # inherit the ignore. Installing Python's handler here makes SIGINT mean Ctrl-C however the suite was started
    # (a caught signal is reset to its default in exec'd children, so they install theirs too).
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # The suite's process hosts Ray drivers, Ray Data iterators (Ray 2.60 leaves a parked "Prefetcher" thread per
    # iterator) and torch threads from hundreds of tests. CI once saw it end with a segmentation fault during
    # interpreter finalization, after every test had passed and the summary was printed: the cause the CLI's
    # _exit_interrupted names. The outcome is decided and reported by now (this hook runs last), so the process
    # ends with pytest's exit status without finalizing, and, as the CLI does, without ray.shutdown(), after which a
    # leftover Ray Data thread can make Ray end the process with 1 itself; a Ray node a test left up goes with it.
    from pipeline.cli import terminate_started_processes

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    terminate_started_processes()
    os._exit(int(getattr(config, "_boxmask_exitstatus", 0)))


def pytest_sessionfinish(session, exitstatus):
    session.config._boxmask_exitstatus = int(exitstatus)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module, with the ``labelkit`` helpers picklable by value (tests using it are
    marked slow). Workers push metrics every 0.5 s instead of 10 s, so a test sees them while the cluster is up.
    Yields the cluster's address."""
    import labelkit
    ray = pytest.importorskip("ray")

    from pipeline.config import RunConfig
    from pipeline.label_service import init_ray

    if ray.is_initialized():
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(labelkit)
    saved = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "500"
    try:
        init_ray(RunConfig())
    finally:
        if saved is None:
            os.environ.pop("RAY_metrics_report_interval_ms")
        else:
            os.environ["RAY_metrics_report_interval_ms"] = saved
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
