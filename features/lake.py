"""The raw event lake: an append-only, date-partitioned Parquet event log plus dimension tables.

Layout under ``lake_dir``::

    raw/events/dt=YYYY-MM-DD/part-00000.parquet   one partition per UTC day (EVENT_SCHEMA)
    raw/events/dt=YYYY-MM-DD/_SUCCESS             completion marker, written last (JSON:
                                                  row count, sha256 of each file and of all)
    raw/items/items.parquet                       item dimension (ITEM_SCHEMA)
    raw/users/users.parquet                       user dimension (USER_SCHEMA)
    raw/_DATASET                                  which source landed here (refuses mixing)

Rows inside a partition are sorted by ``(event_timestamp, event_id)``; that order is the
documented tie-break for events with the same timestamp, all the way to the model.

Replays of a historical dataset set ``ingestion_time`` to the end of the logical day
(the moment a daily batch would have picked the day up), not the wall clock, so landing
the same day twice writes the same bytes; re-landing content that is already there (its
marker verifies and names the same sha256) changes nothing, not even the modification time.

The completion marker is the landing contract with upstream producers: write the data
files, then ``_SUCCESS`` (:func:`write_marker` is the reference); a day counts as landed for
the scheduler once :func:`verify_marker` passes (``grank data landed --date D``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.atomic import atomic_write_text, recover_swaps, sha256_file, staging_dir
from common.errors import UserFacingError

US_PER_DAY = 86_400_000_000
EPOCH = date(1970, 1, 1)

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("value", pa.float32()),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ingestion_time", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("year", pa.int32()),
        pa.field("genres", pa.string()),
    ]
)
USER_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("age", pa.int32()),
        pa.field("gender", pa.string()),
        pa.field("occupation", pa.string()),
        pa.field("zip", pa.string()),
    ]
)
PARQUET_OPTIONS: dict[str, object] = {"compression": "zstd", "write_statistics": True}
MARKER_FILE = "_SUCCESS"


def day_start_us(day: date) -> int:
    """Microseconds since the epoch at 00:00:00 UTC of ``day``."""
    return (day - EPOCH).days * US_PER_DAY


def day_of_us(timestamp_us: int) -> date:
    """The UTC day a microsecond timestamp falls in."""
    return EPOCH + timedelta(days=timestamp_us // US_PER_DAY)


def partition_path(folder: Path, day: date) -> Path:
    """The ``dt=YYYY-MM-DD`` folder of ``day`` under a day-partitioned folder.

    The one spelling of a day partition: the lake, the quarantine, the feature tables and
    the job's state all use it, so readers and writers cannot drift apart.
    """
    return folder / f"dt={day.isoformat()}"


def partition_days(folder: Path) -> list[date]:
    """Days that have a complete ``dt=`` partition under ``folder``, oldest first.

    Hidden staging folders are ignored, and a swap a crash interrupted is finished first
    (:func:`common.atomic.recover_swaps`), so a reader never misses a day swapped in.
    """
    if not folder.is_dir():
        return []
    recover_swaps(folder)
    return sorted(
        date.fromisoformat(p.name[3:]) for p in folder.iterdir() if p.name.startswith("dt=")
    )


@dataclass(frozen=True)
class LakeLayout:
    """The lake's on-disk layout (module docstring), named once.

    Everything that reads or writes the lake (ingest, the gates, the feature job,
    training's catalogue, the CLI) takes its paths from here instead of joining strings.
    A quarantine folder mirrors the lake, so it has a layout too.
    """

    root: Path

    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    @property
    def events_dir(self) -> Path:
        """Folder of the day partitions of the event log."""
        return self.raw_dir / "events"

    def events_partition(self, day: date) -> Path:
        """Folder of the events of ``day`` (``raw/events/dt=YYYY-MM-DD``)."""
        return partition_path(self.events_dir, day)

    def landed_days(self) -> list[date]:
        """Days that have a complete partition, oldest first."""
        return partition_days(self.events_dir)

    def dimension_dir(self, name: str) -> Path:
        """Folder of one dimension table (``items``, ``users``), replaced as a whole."""
        return self.raw_dir / name

    def dimension_file(self, name: str) -> Path:
        """The Parquet file of one dimension table (``raw/items/items.parquet``, ...)."""
        return self.dimension_dir(name) / f"{name}.parquet"

    @property
    def items_file(self) -> Path:
        return self.dimension_file("items")

    @property
    def users_file(self) -> Path:
        return self.dimension_file("users")

    @property
    def dataset_marker(self) -> Path:
        """Which source landed here (``raw/_DATASET``)."""
        return self.raw_dir / "_DATASET"


def events_dir(lake_dir: Path) -> Path:
    """Shorthand for ``LakeLayout(lake_dir).events_dir``."""
    return LakeLayout(lake_dir).events_dir


def partition_dir(lake_dir: Path, day: date) -> Path:
    """Shorthand for ``LakeLayout(lake_dir).events_partition(day)``."""
    return LakeLayout(lake_dir).events_partition(day)


def landed_days(lake_dir: Path) -> list[date]:
    """Shorthand for ``LakeLayout(lake_dir).landed_days()``."""
    return LakeLayout(lake_dir).landed_days()


def read_partition(lake_dir: Path, day: date) -> pa.Table:
    """All events of one landed day, in the lake's sort order."""
    folder = partition_dir(lake_dir, day)
    if not folder.exists():
        raise UserFacingError(f"no raw partition for {day}: expected {folder}")
    files = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f, schema=EVENT_SCHEMA) for f in files])


def data_files(folder: Path) -> list[Path]:
    """The data files of a raw partition (hidden files and the marker excluded), by name."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith((".", "_")))


def fingerprint(file_sha256: dict[str, str]) -> str:
    """One sha256 for a partition's content: over its files' names and sha256, by name."""
    digest = hashlib.sha256()
    for name, sha in sorted(file_sha256.items()):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()


def partition_fingerprint(lake_dir: Path, day: date) -> str:
    """The content fingerprint of a landed partition, computed from its files."""
    folder = partition_dir(lake_dir, day)
    return fingerprint({f.name: sha256_file(f) for f in data_files(folder)})


def write_marker(folder: Path, day: date) -> dict[str, object]:
    """Write ``_SUCCESS`` into a partition folder whose data files are complete (write it last)."""
    files = {f.name: sha256_file(f) for f in data_files(folder)}
    rows = sum(pq.read_metadata(folder / name).num_rows for name in files)
    marker: dict[str, object] = {
        "day": day.isoformat(),
        "rows": rows,
        "files": files,
        "sha256": fingerprint(files),
    }
    atomic_write_text(folder / MARKER_FILE, json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return marker


def verify_marker(lake_dir: Path, day: date) -> str | None:
    """None when the day's marker exists and matches its files; otherwise why not (one line)."""
    folder = partition_dir(lake_dir, day)
    marker_path = folder / MARKER_FILE
    if not marker_path.is_file():
        return f"raw events of {day} have not landed: no completion marker {marker_path}"
    try:
        marker = json.loads(marker_path.read_text())
        files = {f.name: sha256_file(f) for f in data_files(folder)}
        if marker["files"] != files or marker["sha256"] != fingerprint(files):
            return f"raw events of {day} do not match their completion marker {marker_path}"
        rows = sum(pq.read_metadata(folder / name).num_rows for name in files)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        return f"completion marker or files of {day} unreadable: {exc}"
    if marker["rows"] != rows:
        return f"raw events of {day} hold {rows} rows, their marker says {marker['rows']}"
    return None


def write_partition(lake_dir: Path, day: date, events: pa.Table) -> bool:
    """Atomically (re)place the partition of ``day`` with ``events`` (already EVENT_SCHEMA).

    The data file is written, then the marker, then the folder swaps in whole. Returns
    False, having changed nothing, when the same content is already landed and verified.
    """
    if events.num_rows == 0:
        raise UserFacingError(f"no events on {day}: refusing to land an empty partition")
    buffer = io.BytesIO()
    pq.write_table(events, buffer, **PARQUET_OPTIONS)
    data = buffer.getvalue()
    target = partition_dir(lake_dir, day)
    if target.exists() and verify_marker(lake_dir, day) is None:
        landed = json.loads((target / MARKER_FILE).read_text())
        if landed["sha256"] == fingerprint(
            {"part-00000.parquet": hashlib.sha256(data).hexdigest()}
        ):
            return False
    with staging_dir(target) as staging:
        (staging / "part-00000.parquet").write_bytes(data)
        write_marker(staging, day)
    return True


def to_lake_events(ratings: pa.Table) -> pa.Table:
    """Map converted MovieLens ratings onto EVENT_SCHEMA, sorted by the tie-break order."""
    ts_us = ratings["timestamp"].to_numpy() * 1_000_000
    ingestion_us = (ts_us // US_PER_DAY + 1) * US_PER_DAY
    table = pa.table(
        {
            "event_id": ratings["source_row"],
            "user_id": ratings["user_id"],
            "item_id": ratings["item_id"],
            "event_type": pa.array(["rating"] * ratings.num_rows, pa.string()),
            "value": pc.cast(ratings["rating"], pa.float32()),
            "event_timestamp": pa.array(ts_us, pa.timestamp("us", tz="UTC")),
            "ingestion_time": pa.array(ingestion_us, pa.timestamp("us", tz="UTC")),
        },
        schema=EVENT_SCHEMA,
    )
    return table.sort_by([("event_timestamp", "ascending"), ("event_id", "ascending")])


@dataclass
class LandingReport:
    """What a landing wrote: events per day, and the days in range that had none."""

    events_per_day: dict[date, int] = field(default_factory=dict)
    empty_days: list[date] = field(default_factory=list)
    unchanged_days: list[date] = field(default_factory=list)  # already landed, same content

    @property
    def total_events(self) -> int:
        return sum(self.events_per_day.values())


def dataset_day_range(events: pa.Table) -> tuple[date, date]:
    """First and last UTC day that has events."""
    ts = events["event_timestamp"].cast(pa.int64())
    return day_of_us(pc.min(ts).as_py()), day_of_us(pc.max(ts).as_py())


def land_days(
    lake_dir: Path, events: pa.Table, first: date, last: date, *, require_events: bool
) -> LandingReport:
    """Land every day in ``[first, last]`` from ``events`` (EVENT_SCHEMA, sorted).

    ``require_events`` makes a day without events an error (a single-date landing)
    instead of a skipped day (a range, where gaps are normal in the real data).
    """
    lo, hi = dataset_day_range(events)
    if first > last:
        raise UserFacingError(f"empty date range: {first} is after {last}")
    if first < lo or last > hi:
        raise UserFacingError(
            f"date range {first}..{last} is outside the dataset's days {lo}..{hi}"
        )
    _check_writable(lake_dir)
    ts_us = events["event_timestamp"].cast(pa.int64()).to_numpy()
    day_index = ts_us // US_PER_DAY
    report = LandingReport()
    day = first
    while day <= last:
        index = (day - EPOCH).days
        start, stop = np.searchsorted(day_index, [index, index + 1])
        if stop == start:
            if require_events:
                raise UserFacingError(f"no events on {day} in this dataset; nothing landed")
            report.empty_days.append(day)
        else:
            if not write_partition(lake_dir, day, events.slice(start, stop - start)):
                report.unchanged_days.append(day)
            report.events_per_day[day] = int(stop - start)
        day += timedelta(days=1)
    return report


def land_dimensions(lake_dir: Path, items: pa.Table, users: pa.Table) -> None:
    """Write the item and user dimension tables (whole-table replace, atomic)."""
    layout = LakeLayout(lake_dir)
    for name, table, schema in (("items", items, ITEM_SCHEMA), ("users", users, USER_SCHEMA)):
        target = layout.dimension_file(name)
        with staging_dir(target.parent) as staging:
            pq.write_table(table.cast(schema), staging / target.name, **PARQUET_OPTIONS)


def claim_lake(lake_dir: Path, dataset: str) -> None:
    """Record which dataset this lake holds; refuse to mix two sources in one lake."""
    _check_writable(lake_dir)
    marker = LakeLayout(lake_dir).dataset_marker
    if marker.exists():
        owner = marker.read_text().strip()
        if owner != dataset:
            raise UserFacingError(
                f"lake {lake_dir} already holds {owner!r}; use another GRANK_DATA_ROOT for"
                f" {dataset!r}"
            )
        return
    atomic_write_text(marker, dataset + "\n")


def _check_writable(lake_dir: Path) -> None:
    """Fail early, with the path, when the data root cannot be written."""
    probe = lake_dir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserFacingError(f"data root is not writable: {probe}")


def utc_datetime(day: date) -> datetime:
    """Midnight UTC at the start of ``day`` as an aware datetime."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
