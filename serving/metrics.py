"""Prometheus metrics of one serving process, on a registry of its own.

A private registry (not the global default) lets several apps live in one process, as
they do in tests, without duplicate-metric errors.
"""

from __future__ import annotations

import time
import warnings

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("lookup", "generator", "mips", "ranker", "total")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    """Request counts, per-stage latency, batch sizes, snapshot version/age and loads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "grank_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "grank_stage_latency_seconds",
            "Time per /recommend stage (batch-level stages are counted once per request)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "grank_batch_size",
            "Requests scored together in one micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.rejected = Counter(
            "grank_rejected_requests",
            "Requests refused with 503 because the batch queue was full",
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "grank_fallback_recommendations",
            "Recommendations served from the popularity fallback (unknown users)",
            registry=self.registry,
        )
        self.snapshot_loads = Counter(
            "grank_snapshot_loads",
            "Snapshot load attempts by result (ok, failed)",
            ["result"],
            registry=self.registry,
        )
        self.snapshot_load_seconds = Gauge(
            "grank_snapshot_load_seconds",
            "Duration of the last successful snapshot load (read, verify, build searcher)",
            registry=self.registry,
        )
        self.snapshot_info = Gauge(
            "grank_snapshot_info",
            "1 for the snapshot version being served",
            ["version"],
            registry=self.registry,
        )
        self.snapshot_created = Gauge(
            "grank_snapshot_created_timestamp_seconds",
            "Creation time of the served snapshot (age = now - this)",
            registry=self.registry,
        )
        self.snapshot_age = Gauge(
            "grank_snapshot_age_seconds",
            "Seconds since the served snapshot was created",
            registry=self.registry,
        )
        self.screen_rescans = Gauge(
            "grank_mips_screen_rescans",
            "Queries the served snapshot's bf16 screen could not prove exact, so rescanned in"
            " float32 (since that snapshot was loaded; a rising count costs speed, not results)",
            registry=self.registry,
        )
        self._created_at: float | None = None
        self._version: str | None = None
        self.snapshot_age.set_function(self._age)

    def _age(self) -> float:
        return time.time() - self._created_at if self._created_at is not None else float("nan")

    def served(self, version: str, created_at: float) -> None:
        """Record that ``version`` (created at ``created_at``, epoch s) is now served."""
        if self._version is not None and self._version != version:
            # importing feast sets PROMETHEUS_MULTIPROC_DIR, which makes prometheus_client
            # warn on label removal; this registry is private to the process, so it is safe
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.snapshot_info.remove(self._version)
        self.snapshot_info.labels(version=version).set(1)
        self._version = version
        self.snapshot_created.set(created_at)
        self._created_at = created_at
