"""Stopping a daemon started in its own process group (``start_new_session=True``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen[bytes], grace_seconds: float) -> None:
    """SIGTERM the whole group (children such as a worker's executors included), then
    SIGKILL it if the leader has not exited within ``grace_seconds``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
