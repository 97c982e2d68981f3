"""Hot swap: follow ``CURRENT``, load and verify the new snapshot beside the old, then swap.

The served snapshot is one reference guarded by a lock. The watcher loads a new version
completely (checksums, model, searcher) while the old one keeps serving, then replaces
the reference; batches already running hold their own reference to the old snapshot
and finish on it, after which it is garbage-collected. A version that fails to load is
logged, counted, remembered (not retried in a loop) and the old snapshot stays.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from serving.bundle import LoadedSnapshot, load_snapshot
from serving.config import MipsConfig
from serving.metrics import ServingMetrics
from serving.sequences import ItemSource
from serving.snapshots import read_current, version_dir

log = logging.getLogger(__name__)


class SnapshotHolder:
    """The snapshot being served, and the watcher thread that keeps it current."""

    def __init__(
        self,
        snapshots_dir: Path,
        mips_config: MipsConfig,
        metrics: ServingMetrics,
        poll_s: float,
        items: ItemSource | None = None,
    ) -> None:
        self._dir = snapshots_dir
        self._mips_config = mips_config
        self._items = items
        self._metrics = metrics
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._snapshot: LoadedSnapshot | None = None
        self._failed_version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> LoadedSnapshot | None:
        """The snapshot to score with (hold on to it for a whole batch)."""
        with self._lock:
            return self._snapshot

    def swap_to_current(self) -> bool:
        """Load the version ``CURRENT`` names if it is new and swap to it; True if it did."""
        try:
            version = read_current(self._dir)
        except Exception as exc:
            self._record_failure("CURRENT", exc)
            return False
        served = self.current()
        if version is None or version == self._failed_version:
            return False
        if served is not None and served.version == version:
            return False
        started = time.perf_counter()
        try:
            loaded = load_snapshot(version_dir(self._dir, version), self._mips_config, self._items)
        except Exception as exc:
            self._record_failure(version, exc)
            return False
        self._metrics.snapshot_load_seconds.set(time.perf_counter() - started)
        with self._lock:
            self._snapshot = loaded
        self._failed_version = None
        self._metrics.snapshot_loads.labels(result="ok").inc()
        self._metrics.served(loaded.version, loaded.created_at)
        log.info("serving snapshot %s (%d servable items)", loaded.version, loaded.n_servable)
        return True

    def _record_failure(self, version: str, exc: Exception) -> None:
        if version != self._failed_version:
            self._metrics.snapshot_loads.labels(result="failed").inc()
            served = self.current()
            log.error(
                "refused snapshot %s, still serving %s: %s",
                version,
                served.version if served else "nothing",
                exc,
            )
        self._failed_version = version

    def start(self) -> None:
        """Load what ``CURRENT`` names now, then keep polling it in a daemon thread."""
        self.swap_to_current()
        self._thread = threading.Thread(target=self._watch, name="snapshot-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.swap_to_current()
