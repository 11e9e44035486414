"""Interrupting a CLI run the way a user (Ctrl-C) or the OS (SIGKILL) would, at a chosen moment."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable


def interrupt_when(cmd: list[str], env: dict, ready: Callable[[], bool], sig: int = signal.SIGINT,
                   what: str = "", timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group until ``ready()`` holds, then send ``sig`` to the group (the CLI's own
    processes; Ray's belong to the test's cluster). Fails when the command ends before ``ready()``."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before the interrupt {what}: {proc.communicate()[1][-3000:]}"
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
