"""Suite-wide setup."""
from __future__ import annotations

import signal


def pytest_configure(config):
    # Several tests press Ctrl-C (SIGINT) on themselves or on a CLI subprocess. A runner started in the background
    # by a non-interactive shell ignores SIGINT, Python then installs no KeyboardInterrupt handler, and children
    # inherit the ignore. Installing Python's handler here makes SIGINT mean Ctrl-C however the suite was started
    # (a caught signal is reset to its default in exec'd children, so they install theirs too).
    signal.signal(signal.SIGINT, signal.default_int_handler)
