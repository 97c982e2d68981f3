"""Where the feature tables live and how a Spark DataFrame becomes published ``dt=`` partitions.

Contract 2 of docs/architecture.md fixes the table names and the folder layout
``features/<table>/dt=YYYY-MM-DD/``. Published partitions must be byte-identical when a
day is re-run (Feast, training and the quality gate all read them), so every partition
is written as ONE sorted Parquet file named ``part-00000.parquet`` (Spark's own names
carry a random UUID) and swapped into place atomically: readers see the old partition
or the new one, never half of either.

The job's private state (``features/_state/``, see docs/features.md) uses the same
writer; the leading underscore hides it from Spark and pyarrow dataset discovery of
``features/``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from common.atomic import fsync_dir, staging_dir
from features.lake import PARQUET_OPTIONS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

USER_BEHAVIOR_SEQUENCES = "user_behavior_sequences"
ITEM_FEATURES = "item_features"
USER_FEATURES = "user_features"
TRAINING_EXAMPLES = "training_examples"
PUBLISHED_TABLES = (USER_BEHAVIOR_SEQUENCES, ITEM_FEATURES, USER_FEATURES, TRAINING_EXAMPLES)

STATE_DIR = "_state"
USER_STATE = "user_state"
ITEM_STATE = "item_state"
USER_DAILY = "user_daily"
ITEM_DAILY = "item_daily"
STATE_TABLES = (USER_STATE, ITEM_STATE, USER_DAILY, ITEM_DAILY)

PART_FILE = "part-00000.parquet"


def table_dir(features_dir: Path, table: str) -> Path:
    """Folder of one published table (``features/<table>``)."""
    return features_dir / table


def state_dir(features_dir: Path, table: str) -> Path:
    """Folder of one of the job's state tables (``features/_state/<table>``)."""
    return features_dir / STATE_DIR / table


def partition_path(folder: Path, day: date) -> Path:
    """The ``dt=YYYY-MM-DD`` folder of ``day`` under a table folder."""
    return folder / f"dt={day.isoformat()}"


def partition_days(folder: Path) -> list[date]:
    """Days that have a published partition, oldest first (hidden staging folders ignored)."""
    if not folder.exists():
        return []
    return sorted(
        date.fromisoformat(p.name[3:]) for p in folder.iterdir() if p.name.startswith("dt=")
    )


def write_partitions(
    frame: DataFrame, folder: Path, sort_by: Iterable[str], many_days: bool = False
) -> list[date]:
    """Publish ``frame`` (with a ``dt`` date column) as one sorted file per ``dt`` partition.

    All partitions are first written by one Spark job into a hidden staging folder,
    then each ``dt=`` folder replaces its published twin atomically; partitions of
    other days are left alone. ``many_days`` spreads the days over tasks (a rebuild's
    training examples); otherwise one task writes everything, which spares a shuffle.
    Returns the days written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".write-", suffix=".tmp", dir=folder))
    try:
        spread = frame.repartition("dt") if many_days else frame.coalesce(1)
        (
            spread.sortWithinPartitions("dt", *sort_by)
            .write.mode("overwrite")
            .partitionBy("dt")
            .parquet(str(staging / "out"))
        )
        days = partition_days(staging / "out")
        for day in days:
            written = partition_path(staging / "out", day)
            parts = sorted(written.glob("part-*.parquet"))
            with staging_dir(partition_path(folder, day)) as target:
                for index, part in enumerate(parts):
                    _rewrite_reproducibly(part, target / f"part-{index:05d}.parquet")
        fsync_dir(folder)
        return days
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _rewrite_reproducibly(source: Path, destination: Path) -> None:
    """Copy a Spark-written Parquet file through pyarrow, so the same rows give the same bytes.

    parquet-mr lists each column chunk's encodings from a Java HashSet whose order can
    change from one JVM to the next: the rows and the schema are identical, the footer
    bytes are not. Re-running a day must leave byte-identical partitions, so the file is
    rewritten by pyarrow (deterministic; the schema metadata Spark reads back is kept).
    """
    table = pq.ParquetFile(source).read()
    pq.write_table(table, destination, **PARQUET_OPTIONS)
    source.unlink()


def move_partition(source: Path, destination: Path) -> None:
    """Move a partition folder (to quarantine) keeping its bytes; replaces ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(source, destination)
    fsync_dir(source.parent)
    fsync_dir(destination.parent)
