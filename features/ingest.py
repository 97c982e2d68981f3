"""Land a team's own events (Parquet, CSV, JSON Lines) into the raw lake with a dataset config.

``grank data ingest`` and the MovieLens replays (``grank data land``) both come here:
read the files (paths, globs or fsspec URLs), turn the configured columns into the
lake's event schema (``features.lake.EVENT_SCHEMA``), keep the events of the requested
UTC days, translate ids through the lake's id maps (``common.idmap``) unless the config
says they are dense already, and replace each day's partition atomically. Dimension
files (items, users) land as whole tables with the configured attribute columns.

Determinism: a day is written from the same input as the same bytes. Events are ordered
by ``(event_timestamp, event_id)``; where the source has no event id, one is assigned
as ``day_index << 32 | rank`` after a stable sort by time (ties keep the files' order,
files are read in sorted path order). ``ingestion_time`` is the end of the event's day,
as for the replays: the moment a daily batch picks the day up.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import idmap
from common.atomic import staging_dir
from common.errors import UserFacingError
from features import lake
from features.dataset_config import DatasetConfig, DimensionSpec, FileFormat, save_to_lake

ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}
UNIT_FACTOR_US = {"s": 1_000_000, "ms": 1_000, "us": 1}
SUFFIX_FORMATS: dict[str, FileFormat] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst")


def idmaps_dir(lake_dir: Path) -> Path:
    """The id maps beside the raw lake (``lake/idmaps/``)."""
    return lake_dir / "idmaps"


def resolve(patterns: tuple[str, ...] | list[str], base_dir: Path, data_root: Path) -> list[str]:
    """Expand paths, globs and fsspec URLs into a sorted list of files (refuse none)."""
    import fsspec

    files: list[str] = []
    for pattern in patterns:
        text = pattern.replace("{data_root}", str(data_root))
        if "://" not in text and not posixpath.isabs(text):
            text = str(base_dir / text)
        fs, _, found = fsspec.get_fs_token_paths(text)
        found = [p for p in found if fs.isfile(p)]
        if not found:
            raise UserFacingError(f"no file matches {pattern!r} (looked for {text})")
        url = "://" in text
        files.extend(fs.unstrip_protocol(p) if url else p for p in found)
    return sorted(dict.fromkeys(files))


def _format_of(path: str, declared: FileFormat | None) -> FileFormat:
    if declared is not None:
        return declared
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    for suffix, kind in SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return kind
    raise UserFacingError(f"cannot tell the format of {path}: set format (parquet, csv, jsonl)")


def read_files(
    files: list[str],
    declared: FileFormat | None,
    columns: list[str],
    types: dict[str, pa.DataType],
    delimiter: str = ",",
) -> pa.Table:
    """The ``columns`` of every file, concatenated, with ``types`` forced where given."""
    import fsspec
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    tables = []
    for path in files:
        kind = _format_of(path, declared)
        try:
            with fsspec.open(path, mode="rb", compression="infer") as handle:
                if kind == "parquet":
                    table = pq.read_table(handle)
                elif kind == "csv":
                    table = pcsv.read_csv(
                        handle,
                        parse_options=pcsv.ParseOptions(
                            delimiter="\t" if path.lower().endswith(".tsv") else delimiter
                        ),
                        convert_options=pcsv.ConvertOptions(
                            column_types=types, include_columns=columns
                        ),
                    )
                else:
                    schema = pa.schema([(c, t) for c, t in types.items()])
                    table = pjson.read_json(
                        handle,
                        parse_options=pjson.ParseOptions(
                            explicit_schema=schema, unexpected_field_behavior="infer"
                        ),
                    )
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise UserFacingError(f"cannot read {path} as {kind}: {exc}") from exc
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise UserFacingError(
                f"{path} lacks the configured column(s) {missing}; it has {table.column_names}"
            )
        table = table.select(columns)
        for name, kind_type in types.items():
            table = table.set_column(
                table.column_names.index(name), name, _cast(table[name], kind_type, name, path)
            )
        tables.append(table)
    if not tables:
        raise UserFacingError("no input files")
    try:
        return pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    except pa.ArrowException as exc:
        raise UserFacingError(f"input files disagree on column types: {exc}") from exc


def _cast(column: pa.ChunkedArray, kind: pa.DataType, name: str, path: str) -> pa.ChunkedArray:
    if column.type == kind:
        return column
    try:
        return column.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UserFacingError(f"column {name!r} of {path} is not {kind}: {exc}") from exc


# --- events ---------------------------------------------------------------------------


def _id_type(kind: str) -> pa.DataType:
    return pa.string() if kind == "string" else pa.int64()


def read_events(config: DatasetConfig, files: list[str]) -> pa.Table:
    """The configured event columns of ``files`` (source names, source values)."""
    spec = config.events
    cols = spec.columns
    types: dict[str, pa.DataType] = {
        cols.user_id: _id_type(config.ids.user),
        cols.item_id: _id_type(config.ids.item),
    }
    if spec.timestamp.format is not None:
        types[cols.timestamp] = pa.string()
    if cols.value is not None:
        types[cols.value] = pa.float64()
    if cols.event_type is not None:
        types[cols.event_type] = pa.string()
    if cols.event_id is not None:
        types[cols.event_id] = pa.int64()
    wanted = [
        c
        for c in (
            cols.event_id,
            cols.user_id,
            cols.item_id,
            cols.event_type,
            cols.value,
            cols.timestamp,
        )
        if c is not None
    ]
    return read_files(files, spec.format, list(dict.fromkeys(wanted)), types, spec.csv_delimiter)


def timestamps_us(column: pa.ChunkedArray, config: DatasetConfig) -> np.ndarray:
    """Event times as int64 microseconds since the epoch, UTC."""
    spec = config.events.timestamp
    name = config.events.columns.timestamp
    if column.null_count:
        raise UserFacingError(f"{column.null_count} events have no {name!r} (timestamp)")
    try:
        if spec.unit is not None:
            if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
                raise UserFacingError(
                    f"timestamp column {name!r} is {column.type}; timestamp.unit needs numbers"
                    " (use timestamp.format for text)"
                )
            if pa.types.is_integer(column.type):
                raw = column.cast(pa.int64()).to_numpy()
                if spec.unit == "ns":
                    return raw // 1_000
                return raw * UNIT_FACTOR_US[spec.unit]
            seconds = column.cast(pa.float64()).to_numpy()
            factor = 1e-3 if spec.unit == "ns" else UNIT_FACTOR_US[spec.unit]
            return np.round(seconds * factor).astype(np.int64)
        if spec.format is not None:
            parsed = pc.strptime(column, format=spec.format, unit="us")
        elif pa.types.is_timestamp(column.type):
            parsed = column
        else:
            raise UserFacingError(
                f"timestamp column {name!r} is {column.type}: set timestamp.unit (numbers)"
                " or timestamp.format (text)"
            )
        if parsed.type.tz is None:
            parsed = pc.assume_timezone(
                parsed, spec.timezone, ambiguous="earliest", nonexistent="earliest"
            )
        utc = parsed.cast(pa.timestamp("us", tz="UTC"))
        return np.asarray(utc.cast(pa.int64()).to_numpy())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UserFacingError(f"cannot read timestamps of {name!r}: {exc}") from exc


def _event_types(table: pa.Table, config: DatasetConfig) -> pa.Array:
    spec = config.events
    if spec.columns.event_type is None:
        return pa.array([spec.default_type] * table.num_rows, pa.string())
    source = table[spec.columns.event_type].combine_chunks()
    mapped = pc.index_in(source, value_set=pa.array(list(spec.types), pa.string()))
    unknown = source.filter(pc.is_null(mapped))
    if len(unknown):
        counts = pc.value_counts(unknown).to_pylist()
        shown = ", ".join(f"{c['values']!r}: {c['counts']}" for c in counts[:5])
        raise UserFacingError(
            f"{len(unknown)} events have event types the config does not list ({shown});"
            " add them to events.types"
        )
    return pc.take(pa.array(list(spec.types.values()), pa.string()), mapped)


def _dense_ids(column: pa.ChunkedArray, entity: str) -> np.ndarray:
    """Ids used as given: must be integers >= 1 (0 is the padding row)."""
    if column.null_count:
        raise UserFacingError(f"{column.null_count} events have no {entity} id")
    values = column.cast(pa.int64()).to_numpy()
    if len(values) and values.min() < 1:
        raise UserFacingError(
            f"{entity} ids are declared dense but {int((values < 1).sum())} are < 1;"
            f' declare ids.{entity} = "int64" or "string" to map them'
        )
    return np.asarray(values)


def map_ids(
    column: pa.ChunkedArray | pa.Array, entity: str, kind: str, lake_dir: Path
) -> np.ndarray:
    """Dense ids of ``column``: as given, or through the (extended) id map of ``entity``."""
    if kind == "dense":
        return _dense_ids(
            pa.chunked_array([column]) if isinstance(column, pa.Array) else column, entity
        )
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    table = idmap.extend(idmaps_dir(lake_dir), entity, array, kind)
    return table.to_dense(array)


@dataclass(frozen=True)
class Window:
    """The UTC days to land, both inclusive (None: every day the input has)."""

    first: date | None
    last: date | None


def to_lake_events(
    table: pa.Table, config: DatasetConfig, lake_dir: Path, window: Window
) -> tuple[pa.Table, int]:
    """Source rows → EVENT_SCHEMA rows of the window, sorted; also the rows left outside."""
    cols = config.events.columns
    ts_us = timestamps_us(table[cols.timestamp], config)
    day_index = ts_us // lake.US_PER_DAY
    keep = np.ones(len(ts_us), dtype=bool)
    if window.first is not None:
        keep &= day_index >= (window.first - lake.EPOCH).days
    if window.last is not None:
        keep &= day_index <= (window.last - lake.EPOCH).days
    outside = int((~keep).sum())
    table = table.filter(pa.array(keep))
    ts_us, day_index = ts_us[keep], day_index[keep]
    if cols.event_id is not None:
        event_ids = table[cols.event_id]
        if event_ids.null_count:
            raise UserFacingError(f"{event_ids.null_count} events have no {cols.event_id!r}")
        order = np.lexsort((event_ids.to_numpy(), ts_us))
    else:
        order = np.argsort(ts_us, kind="stable")
    table, ts_us, day_index = table.take(pa.array(order)), ts_us[order], day_index[order]
    if cols.event_id is not None:
        event_id = np.asarray(table[cols.event_id].to_numpy())
    else:
        starts = np.searchsorted(day_index, day_index, side="left")
        event_id = (day_index << 32) | (np.arange(len(day_index)) - starts)
    types = _event_types(table, config)
    users = map_ids(table[cols.user_id], "user", config.ids.user, lake_dir)
    items = map_ids(table[cols.item_id], "item", config.ids.item, lake_dir)
    values = (
        pc.cast(table[cols.value], pa.float32())
        if cols.value is not None
        else pa.nulls(table.num_rows, pa.float32())
    )
    utc = pa.timestamp("us", tz="UTC")
    events = pa.table(
        {
            "event_id": pa.array(event_id, pa.int64()),
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "event_type": types,
            "value": values,
            "event_timestamp": pa.array(ts_us, utc),
            "ingestion_time": pa.array((day_index + 1) * lake.US_PER_DAY, utc),
        },
        schema=lake.EVENT_SCHEMA,
    )
    if cols.event_id is not None and len(pc.unique(events["event_id"])) != events.num_rows:
        raise UserFacingError(f"event ids in {cols.event_id!r} are not unique")
    return events, outside


# --- dimensions -----------------------------------------------------------------------


def dimension_path(lake_dir: Path, entity: str) -> Path:
    """The lake's dimension file of ``entity`` (``raw/items/items.parquet``, ...)."""
    return lake.LakeLayout(lake_dir).dimension_file(f"{entity}s")


def dimension_schema(entity: str, spec: DimensionSpec | None) -> pa.Schema:
    attributes = spec.attributes if spec else {}
    return pa.schema(
        [pa.field(f"{entity}_id", pa.int64(), nullable=False)]
        + [pa.field(name, ARROW_TYPES[kind]) for name, kind in attributes.items()]
    )


def read_dimension(
    config: DatasetConfig, entity: str, files: list[str], lake_dir: Path
) -> pa.Table:
    """A dimension file as ``<entity>_id`` (dense) + the configured attributes."""
    spec = config.items if entity == "item" else config.users
    if spec is None:
        raise UserFacingError(f"the dataset config declares no {entity}s section")
    types = {spec.id_column: _id_type(getattr(config.ids, entity))} | {
        name: ARROW_TYPES[kind] for name, kind in spec.attributes.items()
    }
    table = read_files(files, spec.format, list(types), types)
    ids = map_ids(table[spec.id_column], entity, getattr(config.ids, entity), lake_dir)
    if len(np.unique(ids)) != len(ids):
        raise UserFacingError(f"the {entity} dimension lists an id twice")
    columns = {f"{entity}_id": pa.array(ids, pa.int64())} | {
        name: table[name] for name in spec.attributes
    }
    return pa.table(columns).cast(dimension_schema(entity, spec))


def write_dimension(
    lake_dir: Path,
    entity: str,
    spec: DimensionSpec | None,
    given: pa.Table | None,
    seen_ids: np.ndarray,
) -> int:
    """Replace the lake's dimension of ``entity``: the given file's rows (or the landed ones)
    plus a row with empty attributes for each id the events use that it lacks.

    Every item of an event is thereby known to the raw gate and the feature tables.
    Returns the row count.
    """
    schema = dimension_schema(entity, spec)
    path = dimension_path(lake_dir, entity)
    if given is not None:
        table = given
    elif path.exists():
        table = _conform(pq.read_table(path), schema)
    else:
        table = schema.empty_table()
    key = f"{entity}_id"
    missing = np.setdiff1d(np.unique(seen_ids), table[key].to_numpy())
    if len(missing):
        extra = pa.table(
            {
                f.name: pa.array(missing, pa.int64())
                if f.name == key
                else pa.nulls(len(missing), f.type)
                for f in schema
            },
            schema=schema,
        )
        table = pa.concat_tables([table, extra])
    if given is None and not len(missing) and path.exists():
        return table.num_rows
    with staging_dir(path.parent) as staging:
        pq.write_table(table, staging / path.name, **lake.PARQUET_OPTIONS)
    return table.num_rows


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A landed dimension in today's schema (attributes added to the config start empty)."""
    columns = [
        table[f.name].cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


# --- landing --------------------------------------------------------------------------


@dataclass
class IngestReport(lake.LandingReport):
    """What an ingest wrote: events per day, days without events, rows outside the window."""

    outside_window: int = 0
    items: int = 0
    users: int = 0


def ingest(
    config: DatasetConfig,
    lake_dir: Path,
    event_files: list[str],
    window: Window,
    item_files: list[str] | None = None,
    user_files: list[str] | None = None,
    require_events: bool = False,
) -> IngestReport:
    """Land the window's days of ``event_files`` and the dimension files (see module doc).

    ``require_events`` makes a day of the window without events an error (a single-day
    ingest) instead of a skipped day (a range). Nothing is written when the input fails
    a check; the id maps only grow, by the ids of the events and dimensions landed.
    """
    lake.claim_lake(lake_dir, config.name)
    if window.first is not None and window.last is not None and window.first > window.last:
        raise UserFacingError(f"empty date range: {window.first} is after {window.last}")
    source = read_events(config, event_files)
    cols = config.events.columns
    ts_probe = timestamps_us(source[cols.timestamp], config)  # fail on bad times before any write
    if not len(ts_probe):
        raise UserFacingError("the input holds no events")
    lo, hi = lake.day_of_us(int(ts_probe.min())), lake.day_of_us(int(ts_probe.max()))
    first, last = window.first or lo, window.last or hi
    if last < lo or first > hi:
        raise UserFacingError(f"date range {first}..{last} is outside the input's days {lo}..{hi}")
    dims = {}
    for entity, files in (("item", item_files), ("user", user_files)):
        dims[entity] = read_dimension(config, entity, files, lake_dir) if files else None
    events, outside = to_lake_events(source, config, lake_dir, Window(first, last))
    report = IngestReport(outside_window=outside)
    day_index = events["event_timestamp"].cast(pa.int64()).to_numpy() // lake.US_PER_DAY
    days = []
    day = first
    while day <= last:
        index = (day - lake.EPOCH).days
        start, stop = np.searchsorted(day_index, [index, index + 1])
        if stop == start:
            if require_events:
                raise UserFacingError(f"no events on {day} in the input; nothing landed")
            report.empty_days.append(day)
        else:
            days.append((day, int(start), int(stop)))
        day += timedelta(days=1)
    save_to_lake(lake_dir, config)
    report.items = write_dimension(
        lake_dir, "item", config.items, dims["item"], events["item_id"].to_numpy()
    )
    report.users = write_dimension(
        lake_dir, "user", config.users, dims["user"], events["user_id"].to_numpy()
    )
    for day, start, stop in days:
        lake.write_partition(lake_dir, day, events.slice(start, stop - start))
        report.events_per_day[day] = stop - start
    return report
