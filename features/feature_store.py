"""The Feast feature store of the project: configuration, registration, daily load, lookups.

Why the daily load does not call ``FeatureStore.materialize``: since Feast 0.64 it flips
each feature view to ``MATERIALIZING`` in the shared registry for the whole run, and
``get_online_features`` refuses such a view (feast-dev/feast issue 6780), so a
long-running lookup server would fail every lookup during every daily run. Instead
:func:`materialize_window` reads the window's partitions of each feature table (the rows
Feast's materialization would pick: the latest per entity up to the end of the window)
and upserts them with ``FeatureStore.write_to_online_store``. That path never touches a
view's lifecycle state, and each online-store row is replaced in place, so a concurrent
reader sees a user's old values or new ones, never an error or a gap.

The online store never moves a row back in time, and a corrected day does reach it.
Feast's stores disagree here: sqlite overwrites unconditionally (a re-run of an old day
would put older values back), Redis skips a write whose event timestamp is not newer
than the stored one (a corrected day, same timestamps, would never arrive). So Redis runs
with Feast's ``skip_dedup`` and :func:`materialize_window` applies one rule for both: a
row of window ``first..last`` is written unless the stored row's event time falls on a
day after ``last`` (it came from a later day); rows of the same or earlier days are
replaced, so a re-materialized corrected day overwrites what it corrects.

Everything here takes plain values (:class:`features.config.StoreConfig`); the CLI has the
settings build them. Feast is imported inside functions: ``import feast`` costs ~6 s.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.atomic import atomic_write_text
from common.errors import UserFacingError
from features.config import BuildConfig, StoreConfig
from features.feast_repo import ONLINE_VIEWS, build_definitions
from features.feast_repo.definitions import USER_SEQUENCES
from features.feature_tables import partition_days, partition_path, table_dir
from features.lake import utc_datetime

if TYPE_CHECKING:
    from feast import FeatureStore

SEQUENCE_FIELDS: tuple[str, ...] = ("item_seq", "short_item_seq", "ts_seq", "seq_len")


def store_yaml(config: StoreConfig) -> dict[str, Any]:
    """The ``feature_store.yaml`` content for ``config`` (what other teams point the SDK at)."""
    registry: dict[str, Any] = {"cache_ttl_seconds": config.registry_cache_ttl_seconds}
    if config.registry == "sql":
        registry.update(registry_type="sql", path=config.registry_sql_url)
    else:
        registry.update(registry_type="file", path=str(config.repo_dir / "registry.db"))
    online: dict[str, Any]
    if config.online_store == "redis":
        # ordering is enforced by materialize_window (module docstring), not by Feast's
        # strictly-newer check, which drops corrections stamped with the same time
        online = {
            "type": "redis",
            "connection_string": config.redis_connection_string,
            "skip_dedup": True,
        }
    else:
        online = {"type": "sqlite", "path": str(config.repo_dir / "online_store.db")}
    return {
        "project": config.project,
        "provider": "local",
        "registry": registry,
        "online_store": online,
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }


def open_store(config: StoreConfig) -> FeatureStore:
    """Write ``repo_dir/feature_store.yaml`` (atomically) and open the store it describes.

    The file holds the store credentials (Redis password, registry URL), so it is readable
    by its owner only; serving and SDK users of the same account open it by path.
    """
    import yaml

    config.repo_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(store_yaml(config), sort_keys=False)
    yaml_path = config.repo_dir / "feature_store.yaml"
    if not yaml_path.exists() or yaml_path.stat().st_mode & 0o077 or yaml_path.read_text() != text:
        atomic_write_text(yaml_path, text, private=True)
    return connect(config)


def connect(config: StoreConfig) -> FeatureStore:
    """Open the store ``config`` describes without writing anything.

    For the lookup server: it runs with read-only credentials of its own, beside a repo
    folder whose ``feature_store.yaml`` is the pipeline's (other credentials, other owner).
    """
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    repo_config = RepoConfig(**store_yaml(config))
    repo_config.repo_path = config.repo_dir
    return FeatureStore(repo_path=str(config.repo_dir), config=repo_config)


def register(
    store: FeatureStore,
    features_dir: Path,
    user_attributes: dict[str, str] | None = None,
    item_attributes: dict[str, str] | None = None,
    windows_days: tuple[int, ...] = BuildConfig.windows_days,
) -> dict[str, list[str]]:
    """``feast apply`` of the project's definitions over tables built with ``windows_days``;
    repeatable (apply is an upsert).

    Returns the registered names by kind (entities, feature views, feature services).
    """
    from feast import Entity, FeatureService, FeatureView

    missing = [t for t in ONLINE_VIEWS if not table_dir(features_dir, t).is_dir()]
    if missing:
        raise UserFacingError(
            f"feature tables missing under {features_dir}: {', '.join(missing)}"
            " (run `grank features build` first)"
        )
    attributes = {
        k: v
        for k, v in (("user_attributes", user_attributes), ("item_attributes", item_attributes))
        if v is not None
    }
    objects = build_definitions(features_dir, **attributes, windows_days=windows_days)
    store.apply(objects)
    kinds = {"entities": Entity, "feature views": FeatureView, "feature services": FeatureService}
    return {
        kind: [obj.name for obj in objects if isinstance(obj, cls)] for kind, cls in kinds.items()
    }


def day_window(day: date) -> tuple[datetime, datetime]:
    """The materialization window of logical date ``day``: [D 00:00 UTC, D+1 00:00 UTC)."""
    start = utc_datetime(day)
    return start, start + timedelta(days=1)


def latest_rows(table: pa.Table, join_key: str, window_end: datetime) -> pa.Table:
    """The latest row per entity with ``event_timestamp < window_end`` (ties: latest created).

    This is the row Feast's own materialization would pick. A partition of day D holds
    the state as of the end of D, so rows from before the window start are kept (a user
    inactive on D keeps their sequence); rows from after its end would leak the future
    and are dropped.
    """
    end = pa.scalar(window_end, type=table.schema.field("event_timestamp").type)
    in_window = table.filter(pc.less(table["event_timestamp"], end))
    ordered = in_window.sort_by(
        [(join_key, "ascending"), ("event_timestamp", "descending"), ("created", "descending")]
    )
    keys = ordered[join_key]
    if len(keys) == 0:
        return ordered
    first_of_key = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    keep = pa.concat_arrays([pa.array([True]), first_of_key.combine_chunks()])
    return ordered.filter(keep)


def read_window(
    features_dir: Path,
    table: str,
    first: date,
    last: date,
    join_key: str,
    columns: list[str] | None = None,
) -> pa.Table:
    """The latest row per entity over the ``dt`` partitions of ``first..last`` (inclusive).

    Partitions are folded in one day at a time, so memory stays at one row per entity
    even for a multi-year backfill of a full-snapshot table.
    """
    folder = table_dir(features_dir, table)
    days = [day for day in partition_days(folder) if first <= day <= last]
    if not days:
        window = str(first) if first == last else f"{first}..{last}"
        raise UserFacingError(
            f"no {table} partition for {window} under {folder}"
            " (run `grank features build` for those days first)"
        )
    _, window_end = day_window(last)
    latest: pa.Table | None = None
    for day in days:
        rows = pq.read_table(partition_path(folder, day), columns=columns)
        merged = rows if latest is None else pa.concat_tables([latest, rows.cast(latest.schema)])
        latest = latest_rows(merged, join_key, window_end)
    assert latest is not None
    return latest


def materialize_window(
    store: FeatureStore, features_dir: Path, first: date, last: date, batch_rows: int = 1000
) -> dict[str, int]:
    """Load the days ``first..last`` into the online store; idempotent. Returns rows per view.

    The window is [first 00:00, last+1 00:00) UTC, derived from the dates only. Each
    entity gets its latest row of the window (what Feast's ``materialize`` would write).
    Rows go out in batches of ``batch_rows`` (one online-store transaction each), so a
    sqlite reader never waits behind one long write lock.
    """
    if batch_rows < 1:
        raise UserFacingError(f"batch_rows must be positive, got {batch_rows}")
    if first > last:
        raise UserFacingError(f"window start {first} is after its end {last}")
    registered = {view.name: view for view in store.list_feature_views()}
    unregistered = [name for name in ONLINE_VIEWS if name not in registered]
    if unregistered:
        raise UserFacingError(
            f"feature views not registered: {', '.join(unregistered)}"
            " (run `grank features register` first)"
        )
    tables: dict[str, pa.Table] = {}
    for name in ONLINE_VIEWS:
        view = registered[name]
        columns = [*view.join_keys, *(f.name for f in view.features), "event_timestamp", "created"]
        tables[name] = read_window(features_dir, name, first, last, view.join_keys[0], columns)
    written: dict[str, int] = {}
    for name, rows in tables.items():
        written[name] = 0
        key = registered[name].join_keys[0]
        for offset in range(0, rows.num_rows, batch_rows):
            batch = rows.slice(offset, batch_rows)
            stored = stored_days(store, registered[name], key, batch[key].to_pylist())
            newer = pa.array([d is not None and d > last for d in stored], pa.bool_())
            batch = batch.filter(pc.invert(newer))
            if batch.num_rows:
                store.write_to_online_store(name, batch.to_pandas(), allow_registry_cache=True)
            written[name] += batch.num_rows
    return written


def stored_days(store: FeatureStore, view: Any, join_key: str, ids: list[int]) -> list[date | None]:
    """Per entity, the UTC day of the event time the online store holds (None: no row)."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    keys = [EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=int(i))]) for i in ids]
    found = store._get_provider().online_read(config=store.config, table=view, entity_keys=keys)
    days: list[date | None] = []
    for moment, _ in found:
        if moment is None:
            days.append(None)
        else:
            aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            days.append(aware.astimezone(UTC).date())
    return days


def materialize_day(
    store: FeatureStore, features_dir: Path, day: date, batch_rows: int = 1000
) -> dict[str, int]:
    """The daily run: :func:`materialize_window` of the one logical date ``day``."""
    return materialize_window(store, features_dir, day, day, batch_rows)


def online_sequences(
    store: FeatureStore, user_ids: Iterable[int]
) -> dict[int, dict[str, Any] | None]:
    """Sequence features of each user from the online store; an unknown user maps to None.

    The entry point for serving: ``{user_id: {"item_seq": [...], "short_item_seq": [...],
    "ts_seq": [...], "seq_len": n} | None}``.
    """
    ids = list(dict.fromkeys(int(u) for u in user_ids))
    if not ids:
        return {}
    refs = [f"{USER_SEQUENCES}:{name}" for name in SEQUENCE_FIELDS]
    columns = store.get_online_features(
        features=refs, entity_rows=[{"user_id": u} for u in ids]
    ).to_dict()
    result: dict[int, dict[str, Any] | None] = {}
    for row, user_id in enumerate(ids):
        values = {name: columns[name][row] for name in SEQUENCE_FIELDS}
        result[user_id] = None if values["item_seq"] is None else values
    return result
