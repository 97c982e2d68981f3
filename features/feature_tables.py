"""Where the feature tables live and how a Spark DataFrame becomes committed ``dt=`` partitions.

Contract 2 of docs/architecture.md fixes the table names and the folder layout
``features/<table>/dt=YYYY-MM-DD/``. Committed partitions must be byte-identical when a
day is re-run (Feast, training and the quality gate all read them), so every partition
is written as ONE sorted Parquet file named ``part-00000.parquet``, by pyarrow (whose
output is deterministic, unlike parquet-mr's), and swapped into place atomically:
readers see the old partition or the new one, never half of either.

The job's private state (``features/_state/``, see docs/features.md) uses the same
writer; the leading underscore hides it from Spark and pyarrow dataset discovery of
``features/``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import fsync_dir, hidden_temp_dir, staging_dir
from features.lake import PARQUET_OPTIONS, partition_days, partition_path

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

USER_BEHAVIOR_SEQUENCES = "user_behavior_sequences"
ITEM_FEATURES = "item_features"
USER_FEATURES = "user_features"
TRAINING_EXAMPLES = "training_examples"
# the public tables (Contract 2) other layers read, beside the job's private state below
PUBLIC_TABLES = (USER_BEHAVIOR_SEQUENCES, ITEM_FEATURES, USER_FEATURES, TRAINING_EXAMPLES)

STATE_DIR = "_state"
USER_STATE = "user_state"
ITEM_STATE = "item_state"
USER_DAILY = "user_daily"
ITEM_DAILY = "item_daily"
STATE_TABLES = (USER_STATE, ITEM_STATE, USER_DAILY, ITEM_DAILY)

PART_FILE = "part-00000.parquet"


@dataclass(frozen=True)
class FeatureTables:
    """The feature tables' on-disk layout (Contract 2), named once.

    The feature job writes it; Feast, the quality gate, training and the CLI read it.
    All of them take their paths from here instead of joining table names to folders.
    """

    root: Path

    def table_dir(self, table: str) -> Path:
        """Folder of one public table (``features/<table>``)."""
        return self.root / table

    def partition(self, table: str, day: date) -> Path:
        """The day partition of a public table (``features/<table>/dt=YYYY-MM-DD``)."""
        return partition_path(self.table_dir(table), day)

    def days(self, table: str) -> list[date]:
        """Days with a committed partition of ``table``, oldest first."""
        return partition_days(self.table_dir(table))

    @property
    def state_root(self) -> Path:
        """The job's private state (``features/_state``), hidden from dataset discovery."""
        return self.root / STATE_DIR

    def state_dir(self, table: str) -> Path:
        """Folder of one of the job's state tables (``features/_state/<table>``)."""
        return self.state_root / table


def table_dir(features_dir: Path, table: str) -> Path:
    """Shorthand for ``FeatureTables(features_dir).table_dir(table)``."""
    return FeatureTables(features_dir).table_dir(table)


def state_dir(features_dir: Path, table: str) -> Path:
    """Shorthand for ``FeatureTables(features_dir).state_dir(table)``."""
    return FeatureTables(features_dir).state_dir(table)


def write_partitions(
    frame: DataFrame, folder: Path, sort_by: Iterable[str], many_days: bool = False
) -> list[date]:
    """Write ``frame`` (with a ``dt`` date column) as one sorted file per ``dt`` partition.

    One Spark job sorts the rows and hands them, as Arrow batches, to a pyarrow writer
    that fills a hidden staging folder; then each ``dt=`` folder replaces its committed
    twin atomically; partitions of other days are left alone. ``many_days`` spreads the
    days over tasks (a rebuild's training examples); otherwise one task writes everything,
    which spares a shuffle. Returns the days written.

    Why not Spark's Parquet writer: parquet-mr shreds list columns value by value (the
    rebuild's training examples hold ~120 history values per row) and orders each column
    chunk's encodings from a Java HashSet whose order can change from one JVM to the next,
    so its files had to be read back and rewritten by pyarrow anyway: writing them once,
    with pyarrow, is the bulk of the rebuild's speed-up (docs/benchmarks.md). The
    executors therefore run Python (``features.spark``). On a cluster the staging folder
    lies under ``folder`` on the shared data root, where every worker writes its days.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = hidden_temp_dir(folder, prefix=".write-")
    try:
        spread = frame.repartition("dt") if many_days else frame.coalesce(1)
        writer = functools.partial(
            _write_sorted_days, str(staging), spark_metadata(frame.drop("dt"))
        )
        written = (
            spread.sortWithinPartitions("dt", *sort_by).mapInArrow(writer, "dt DATE").collect()
        )
        days = sorted(row["dt"] for row in written)
        for day in days:
            with staging_dir(partition_path(folder, day)) as target:
                os.replace(partition_path(staging, day) / PART_FILE, target / PART_FILE)
        fsync_dir(folder)
        return days
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def spark_metadata(frame: DataFrame) -> dict[bytes, bytes]:
    """The key-value metadata Spark's own Parquet writer puts in a file of ``frame``'s rows.

    Kept so that Spark reads our files back with their exact Spark types and the bytes
    stay those of the earlier Spark-then-pyarrow files. The schema JSON keeps Spark's
    key order (``type`` first), as Scala writes it: hence no ``StructType.json()``,
    which sorts keys.
    """
    return {
        b"org.apache.spark.version": frame.sparkSession.version.encode(),
        b"org.apache.spark.sql.parquet.row.metadata": json.dumps(
            frame.schema.jsonValue(), separators=(",", ":")
        ).encode(),
    }


# Rows per Parquet row group: a day's part file is written a group at a time, so the
# writer holds at most this many rows (a training example with full 200-event histories
# is ~6 KB in memory: ~100 MB), however many rows the day has.
ROW_GROUP_ROWS = 16_384


def _write_sorted_days(
    staging: str, metadata: dict[bytes, bytes], batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """Write one task's rows, sorted by ``dt`` first, as ``<staging>/dt=D/part-00000.parquet``.

    Runs on the executors (``mapInArrow``). Memory is bounded by one row group
    (``ROW_GROUP_ROWS``), not by the day or the task: a user with 100,000 events in a
    day makes a big file, not a big process. Yields the days written, one row each.
    """
    day: _DayFile | None = None
    for batch in (b for b in batches if b.num_rows):
        days = batch.column("dt").cast(pa.int32()).to_numpy()
        cuts = [0, *(np.flatnonzero(days[1:] != days[:-1]) + 1).tolist(), len(days)]
        for start, stop in itertools.pairwise(cuts):
            part = batch.slice(start, stop - start)
            if day is None or days[start] != day.number:
                if day is not None:
                    yield day.close()
                day = _DayFile(Path(staging), metadata, part)
            day.add(part)
    if day is not None:
        yield day.close()


class _DayFile:
    """The part file of one day, written one fixed-size row group at a time.

    Each group's chunks are combined first: pyarrow's page boundaries depend on how a
    column is chunked, and a re-run must give the same bytes whatever Spark's batch sizes
    were; with groups cut every ``ROW_GROUP_ROWS`` rows the bytes depend on the rows only.
    The folder must not exist yet: a day split across two tasks fails here rather than
    commit half of its rows.
    """

    def __init__(self, staging: Path, metadata: dict[bytes, bytes], first: pa.RecordBatch):
        self.day = first.column("dt")[0].as_py()
        self.number = int(first.column("dt").cast(pa.int32())[0].as_py())
        target = partition_path(staging, self.day)
        target.mkdir()
        # as open as the driver's staging folder, whatever the executor's umask: the driver
        # (maybe another user of the same group) moves the file out and deletes the folder
        target.chmod(staging.stat().st_mode & 0o7777)
        schema = (
            pa.Table.from_batches([first]).drop_columns(["dt"]).replace_schema_metadata(metadata)
        ).schema
        self.writer = pq.ParquetWriter(target / PART_FILE, schema, **PARQUET_OPTIONS)
        self.held: list[pa.RecordBatch] = []
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self.held.append(batch)
        self.rows += batch.num_rows
        while self.rows >= ROW_GROUP_ROWS:
            table = pa.Table.from_batches(self.held)
            self._write(table.slice(0, ROW_GROUP_ROWS))
            self.held = table.slice(ROW_GROUP_ROWS).to_batches()
            self.rows -= ROW_GROUP_ROWS

    def close(self) -> pa.RecordBatch:
        """Write the last group; return the day as a one-row batch."""
        if self.rows:
            self._write(pa.Table.from_batches(self.held))
        self.writer.close()
        return pa.RecordBatch.from_arrays([pa.array([self.day], pa.date32())], names=["dt"])

    def _write(self, group: pa.Table) -> None:
        self.writer.write_table(
            group.drop_columns(["dt"]).combine_chunks(), row_group_size=ROW_GROUP_ROWS
        )


def move_partition(source: Path, destination: Path) -> None:
    """Move a partition folder (to quarantine) keeping its bytes; replaces ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(source, destination)
    fsync_dir(source.parent)
    fsync_dir(destination.parent)
