"""The features layer's knobs: one definition of each, and of its default.

These dataclasses are what the feature code takes: the Spark session
(features/spark.py), the build (features/jobs.py's ``BuildSpec``), the quality gates
(features/quality.py's ``QualitySpec``), the Feast store (features/feature_store.py) and
the lookup server (features/lookup_server.py). ``grank/config.py`` composes them into the
settings a deployment overrides (``GRANK_SPARK__<FIELD>``, ``GRANK_FEATURES__<FIELD>``,
``GRANK_QUALITY__<FIELD>``, ``GRANK_FEAST__<FIELD>``), taking each default from here,
and hands them back. They sit in one module of their own, not beside the code that reads
them, because those modules import pyarrow, Great Expectations or FastAPI, and reading the
settings must stay cheap for every CLI command. The names of the window count columns sit
here too, beside the windows they follow, for every layer that names one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class SparkConfig:
    """Where Spark runs; ``local[*]`` on one machine, ``spark://...`` in the compose stack."""

    master: str = "local[*]"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    # the address executors reach the driver at (and the driver binds): loopback for
    # local[*] and a cluster on this machine, the host/service name across machines
    driver_host: str = "127.0.0.1"
    # the Python the executors run (needs pyarrow and numpy; our code is shipped with the
    # job); empty = the driver's interpreter path, which workers must then have too
    executor_python: str = ""
    # heap of each executor on a cluster (local[*] runs the tasks in the driver's heap)
    executor_memory: str = "4g"


# The feature tables' event counts: ``pop_*`` of an item, ``events_*`` of a user, one
# ``<prefix>_<w>d`` per window of BuildConfig.windows_days and the all-time ``<prefix>_total``.
POPULARITY = "pop"
ACTIVITY = "events"


def window_column(prefix: str, days: int) -> str:
    """The count of the ``days`` days ending with the row's day: ``pop_7d``, ``events_30d``."""
    return f"{prefix}_{days}d"


def count_columns(prefix: str, windows_days: tuple[int, ...]) -> tuple[str, ...]:
    """The count columns of ``prefix``: one per window, in order, then ``<prefix>_total``."""
    return (*(window_column(prefix, w) for w in windows_days), f"{prefix}_total")


def user_profile_columns(windows_days: tuple[int, ...]) -> tuple[str, ...]:
    """The activity of a user that the profile serves and a model reads besides the sequences.

    No one-day count: that is the day's own activity, which the sequence already carries.
    """
    longer = tuple(w for w in windows_days if w > 1)
    return (*count_columns(ACTIVITY, longer), "mean_value", "tenure_days")


def item_context_columns(windows_days: tuple[int, ...]) -> tuple[str, ...]:
    """The popularity and age of an item that a model reads besides its embedding."""
    return (*count_columns(POPULARITY, windows_days), "age_days")


@dataclass(frozen=True)
class BuildConfig:
    """The shapes of the feature tables a build writes, and how much state it keeps."""

    long_seq_len: int = 200
    short_seq_len: int = 64
    windows_days: tuple[int, ...] = (1, 7, 30)
    # states of built days up to this many days before the newest one are kept, so a raw
    # day landing (or corrected) that late cascades from a state instead of a rebuild
    keep_state_days: int = 7


@dataclass(frozen=True)
class QualityConfig:
    """The gates' thresholds: which deviations are fatal and which only warn."""

    volume_trailing_days: int = 7
    volume_low_ratio: float = 0.2
    volume_high_ratio: float = 5.0
    # a user with more events than this in one day is reported (warning), and still built
    max_user_events: int = 10_000


@dataclass(frozen=True)
class StoreConfig:
    """Where the Feast store lives and which backends it uses."""

    repo_dir: Path
    project: str = "grank"
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection_string: str = "127.0.0.1:6379"
    registry: Literal["file", "sql"] = "file"
    registry_sql_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    registry_cache_ttl_seconds: int = 60


@dataclass(frozen=True)
class LookupLimits:
    """What one request to the lookup server may ask for (413 beyond).

    10,000 users of grank_ranker_v1 in one request held a worker for 3-5 s
    (docs/feature-lookups.md).
    """

    max_entities: int = 1_000
    max_body_bytes: int = 1 << 20
