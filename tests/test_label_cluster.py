"""How many label workers, and what GPU share each, a Ray cluster fits (pure functions: no cluster started), and
how an interrupted command leaves the processes it started."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.config import LabelConfig
from pipeline.errors import UserError
from pipeline.label_service.cluster import check_fits, resolve_gpus_per_worker, resolve_workers


def test_auto_worker_count_fits_the_cluster():

    assert resolve_workers("auto", {"CPU": 2.0}, 1.0, -1.0) == 2
    assert resolve_workers("auto", {"CPU": 16.0}, 3.0, -1.0) == 5
    assert resolve_workers("auto", {"CPU": 16.0, "GPU": 2.0}, 1.0, -1.0) == 2          # one GPU each
    assert resolve_workers("auto", {"CPU": 16.0, "GPU": 2.0}, 1.0, 0.5) == 4           # half a GPU each
    assert resolve_workers("auto", {"CPU": 16.0, "GPU": 2.0}, 1.0, -1.0, "cpu") == 16  # CPU teacher
    assert resolve_workers(3, {"CPU": 2.0}, 1.0, -1.0) == 3   # as given; the resource check names the shortfall
    with pytest.raises(UserError, match="label.workers: auto: the Ray cluster has 1 CPUs"):
        resolve_workers("auto", {"CPU": 1.0}, 2.0, -1.0)
    with pytest.raises(UserError, match="at least 1 or auto"):
        resolve_workers(0, {"CPU": 2.0}, 1.0, -1.0)


def test_gpus_per_worker_defaults_to_an_equal_share_of_the_cluster_gpus():
    assert LabelConfig().gpus_per_worker < 0                               # auto
    assert resolve_gpus_per_worker(-1.0, 0.0, 2) == 0.0                    # no GPU in the cluster
    assert resolve_gpus_per_worker(-1.0, 8.0, 2) == 1.0                    # at most one each
    assert resolve_gpus_per_worker(-1.0, 2.0, 2) == 1.0
    assert resolve_gpus_per_worker(-1.0, 1.0, 2) == 0.5
    share = resolve_gpus_per_worker(-1.0, 1.0, 3)
    assert share == 0.3333 and 3 * share <= 1.0                            # the shares fit
    assert resolve_gpus_per_worker(-1.0, 4.0, 2, device="cpu") == 0.0      # teacher pinned to the CPU
    assert resolve_gpus_per_worker(-1.0, 4.0, 2, device="cuda") == 1.0
    assert resolve_gpus_per_worker(0.0, 4.0, 2) == 0.0                     # an explicit value wins
    assert resolve_gpus_per_worker(0.25, 0.0, 2) == 0.25


def test_workers_that_do_not_fit_are_refused_naming_the_shortfall():
    check_fits(2, {"CPU": 2.0}, 1.0, 0.0)
    check_fits(2, {"CPU": 4.0, "GPU": 1.0}, 1.0, 0.5)
    with pytest.raises(UserError, match=r"label.workers: 4 workers x 1 CPUs need 4 CPUs, the Ray cluster has 2: "
                                            r"lower --workers or label.cpus_per_worker"):
        check_fits(4, {"CPU": 2.0}, 1.0, 0.0)
    with pytest.raises(UserError, match=r"2 workers x 1 GPUs need 2 GPUs, the Ray cluster has 0: .*gpus_per_worker"):
        check_fits(2, {"CPU": 4.0}, 1.0, 1.0)


def test_an_interrupted_command_ends_with_130_and_takes_the_processes_it_started_with_it(tmp_path):
    # The stand-in for a local Ray node: a child that starts a grandchild, as the raylet starts its agents. Both
    # must be gone once the command has left; an agent orphaned by its raylet lingered for minutes before.
    pids = tmp_path / "pids"
    script = f"""
import subprocess, sys, time
from pipeline.cli import _exit_interrupted
child = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; g = subprocess.Popen(['sleep', '300']); "
    "open({str(pids)!r}, 'w').write(str(g.pid)); time.sleep(300)"])
while True:
    try:
        grandchild = open({str(pids)!r}).read()
        break
    except FileNotFoundError:
        time.sleep(0.05)
print(child.pid, grandchild, flush=True)
_exit_interrupted()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    started = [int(p) for p in done.stdout.split()]
    assert len(started) == 2

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"    # a zombie has ended
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in started)
