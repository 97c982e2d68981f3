"""Feast repository, registration, materialization, offline retrieval, online stores, registry.

Feature tables are written here with pyarrow in the exact shape of docs/architecture.md
Contract 2 (microsecond UTC timestamps, list columns), so these tests do not need Spark.
Redis and PostgreSQL tests use the real services; with CI set they fail when unreachable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import UserFacingError
from features.config import StoreConfig
from features.feast_repo import FEATURE_SERVICES
from features.feature_store import (
    day_window,
    latest_rows,
    materialize_day,
    materialize_window,
    online_sequences,
    open_store,
    register,
)
from features.lake import US_PER_DAY, day_start_us

if TYPE_CHECKING:
    from feast import FeatureStore

DAY1 = date(2000, 5, 1)
DAY2 = date(2000, 5, 2)
TS = pa.timestamp("us", tz="UTC")
LIST_INT = pa.list_(pa.int64())


def require_service(host: str, port: int) -> None:
    """Skip when a local service is down, but fail under CI (where it must be running)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail(f"{host}:{port} is unreachable and CI is set")
        pytest.skip(f"{host}:{port} is unreachable")


def sequence_of(user_id: int, day: date) -> list[int]:
    """The item sequence a test user has at the end of ``day`` (distinct per user and day)."""
    return [user_id, 1000 + (day - DAY1).days]


def times_of(user_id: int, day: date) -> list[int]:
    """The event times (us UTC) of :func:`sequence_of`: one second apart from ``day``'s start."""
    start = day_start_us(day)
    return [start + 1_000_000 * (i + 1) for i in range(len(sequence_of(user_id, day)))]


def write_feature_tables(features_dir: Path, day: date, user_ids: list[int]) -> None:
    """Contract-shaped partitions of the three online tables for ``day`` (pyarrow, us UTC)."""
    start = day_start_us(day)
    end_of_day = start + US_PER_DAY - 1
    seqs = [sequence_of(u, day) for u in user_ids]
    ts_seqs = [times_of(u, day) for u in user_ids]
    last_ts = [t[-1] for t in ts_seqs]
    n = len(user_ids)

    def stamps(values: list[int]) -> pa.Array:
        return pa.array(values, pa.int64()).cast(TS)

    tables = {
        "user_behavior_sequences": pa.table(
            {
                "user_id": pa.array(user_ids, pa.int64()),
                "item_seq": pa.array(seqs, LIST_INT),
                "ts_seq": pa.array(ts_seqs, LIST_INT),
                "event_type_seq": pa.array([["rating"] * len(s) for s in seqs]),
                "value_seq": pa.array([[4.0] * len(s) for s in seqs], pa.list_(pa.float32())),
                "short_item_seq": pa.array([s[-64:] for s in seqs], LIST_INT),
                "seq_len": pa.array([len(s) for s in seqs], pa.int64()),
                "last_event_ts": stamps(last_ts),
                "event_timestamp": stamps(last_ts),
                "created": stamps([end_of_day] * n),
            }
        ),
        "user_features": pa.table(
            {
                "user_id": pa.array(user_ids, pa.int64()),
                **{
                    f"events_{w}": pa.array([(day - DAY1).days + 1] * n, pa.int64())
                    for w in ("1d", "7d", "30d", "total")
                },
                "mean_value": pa.array([4.0] * n, pa.float32()),
                "first_seen_ts": stamps([day_start_us(DAY1)] * n),
                "tenure_days": pa.array([(day - DAY1).days] * n, pa.int64()),
                "age": pa.array([25] * n, pa.int32()),
                "gender": pa.array(["F"] * n),
                "occupation": pa.array(["10"] * n),
                "event_timestamp": stamps([end_of_day] * n),
                "created": stamps([end_of_day] * n),
            }
        ),
        "item_features": pa.table(
            {
                "item_id": pa.array([1, 2], pa.int64()),
                **{f"pop_{w}": pa.array([7, 3], pa.int64()) for w in ("1d", "7d", "30d", "total")},
                "first_seen_ts": stamps([day_start_us(DAY1)] * 2),
                "age_days": pa.array([(day - DAY1).days] * 2, pa.int64()),
                "title": pa.array(["Toy Story (1995)", "Jumanji (1995)"]),
                "year": pa.array([1995, 1995], pa.int32()),
                "genres": pa.array(["Animation", "Adventure"]),
                "event_timestamp": stamps([end_of_day] * 2),
                "created": stamps([end_of_day] * 2),
            }
        ),
    }
    for name, table in tables.items():
        folder = features_dir / name / f"dt={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "part-00000.parquet")


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two days of tables: users 1..3 on day 1, users 1..2 again (new values) on day 2."""
    folder = tmp_path_factory.mktemp("feast_tables") / "features"
    write_feature_tables(folder, DAY1, [1, 2, 3])
    write_feature_tables(folder, DAY2, [1, 2])
    return folder


@pytest.fixture(scope="module")
def sqlite_store(features_dir: Path) -> FeatureStore:
    """A registered store with the default backends (file registry, sqlite online store)."""
    store = open_store(StoreConfig(repo_dir=features_dir.parent / "feast"))
    register(store, features_dir)
    return store


def test_register_is_repeatable_and_defines_the_contract(
    sqlite_store: FeatureStore, features_dir: Path
) -> None:
    registered = register(sqlite_store, features_dir)  # second apply: an upsert, not an error
    assert registered["feature services"] == list(FEATURE_SERVICES)
    assert {e.name for e in sqlite_store.list_entities()} == {"user", "item"}
    views = {v.name: v for v in sqlite_store.list_feature_views()}
    assert set(views) == {"user_behavior_sequences", "user_features", "item_features"}
    dtypes = {f.name: str(f.dtype) for f in views["user_behavior_sequences"].features}
    for name in ("item_seq", "ts_seq", "short_item_seq"):
        assert dtypes[name] == "Array(Int64)"
    services = {s.name: s for s in sqlite_store.list_feature_services()}
    assert set(services) == set(FEATURE_SERVICES)
    generator = {
        f.name for p in services["grank_generator_v1"].feature_view_projections for f in p.features
    }
    assert generator == {"short_item_seq", "seq_len"}
    assert (features_dir.parent / "feast" / "feature_store.yaml").exists()


def test_register_names_missing_tables(tmp_path: Path) -> None:
    store = open_store(StoreConfig(repo_dir=tmp_path / "feast"))
    with pytest.raises(UserFacingError, match="run `grank features build` first"):
        register(store, tmp_path / "features")


def test_window_is_derived_from_the_date_only() -> None:
    start, end = day_window(DAY2)
    assert (start.isoformat(), end.isoformat()) == (
        "2000-05-02T00:00:00+00:00",
        "2000-05-03T00:00:00+00:00",
    )


def test_latest_rows_keeps_one_row_per_entity_and_drops_the_future() -> None:
    start, end = day_window(DAY1)
    table = pa.table(
        {
            "user_id": pa.array([1, 1, 2, 3], pa.int64()),
            "v": pa.array([10, 11, 20, 30], pa.int64()),
            "event_timestamp": pa.array([start - timedelta(days=3), start, start, end], TS),
            "created": pa.array([start] * 4, TS),
        }
    )
    picked = latest_rows(table, "user_id", end).to_pydict()
    assert picked["user_id"] == [1, 2]  # user 3's row lies after the window: dropped
    assert picked["v"] == [11, 20]


def test_materialize_day_by_day_and_idempotent(
    sqlite_store: FeatureStore, features_dir: Path
) -> None:
    assert materialize_day(sqlite_store, features_dir, DAY1) == {
        "user_behavior_sequences": 3,
        "user_features": 3,
        "item_features": 2,
    }
    assert online_sequences(sqlite_store, [1, 3, 999])[1]["item_seq"] == sequence_of(1, DAY1)  # type: ignore[index]
    materialize_window(sqlite_store, features_dir, DAY2, DAY2, batch_rows=1)
    materialize_window(sqlite_store, features_dir, DAY2, DAY2)  # re-run: same state
    found = online_sequences(sqlite_store, [1, 3, 999])
    assert found[999] is None
    assert found[1] == {
        "item_seq": sequence_of(1, DAY2),
        "short_item_seq": sequence_of(1, DAY2),
        "ts_seq": [day_start_us(DAY2) + 1_000_000, day_start_us(DAY2) + 2_000_000],
        "seq_len": 2,
    }
    assert found[3]["item_seq"] == sequence_of(3, DAY1)  # type: ignore[index]  # inactive on day 2
    profile = sqlite_store.get_online_features(
        features=sqlite_store.get_feature_service("user_profile_v1"),
        entity_rows=[{"user_id": 2}],
    ).to_dict()
    assert profile["events_total"] == [2]
    assert profile["gender"] == ["F"]


def test_materialize_missing_partition_is_a_clear_error(
    sqlite_store: FeatureStore, features_dir: Path
) -> None:
    missing = date(2000, 5, 9)
    with pytest.raises(
        UserFacingError, match=r"no user_behavior_sequences partition for 2000-05-09"
    ):
        materialize_window(sqlite_store, features_dir, missing, missing)


def test_historical_retrieval_is_point_in_time_correct(sqlite_store: FeatureStore) -> None:
    """No returned value may come from after its row's timestamp (checked via last_event_ts)."""
    day1_last = day_window(DAY1)[0] + timedelta(seconds=2)
    day2_last = day1_last + timedelta(days=1)
    entity_df = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 3],
            "event_timestamp": [
                day1_last - timedelta(hours=1),  # before any value of user 1
                day1_last + timedelta(hours=1),  # between day 1 and day 2
                day2_last - timedelta(microseconds=1),  # 1 us before the day-2 value
                day2_last + timedelta(days=400),  # long after: sequences never expire
                day2_last,  # user 3 only has day 1
            ],
        }
    )
    frame = sqlite_store.get_historical_features(
        entity_df=entity_df,
        features=["user_behavior_sequences:item_seq", "user_behavior_sequences:last_event_ts"],
    ).to_df()
    known = frame.dropna(subset=["last_event_ts"])
    assert (known["last_event_ts"] <= known["event_timestamp"]).all()
    seq_at = {(row.user_id, row.event_timestamp): list(row.item_seq) for row in known.itertuples()}
    assert seq_at == {
        (1, day1_last + timedelta(hours=1)): sequence_of(1, DAY1),
        (1, day2_last - timedelta(microseconds=1)): sequence_of(1, DAY1),
        (1, day2_last + timedelta(days=400)): sequence_of(1, DAY2),
        (3, day2_last): sequence_of(3, DAY1),
    }
    # The dask file store drops (rather than nulls) a row with no value yet
    # (docs/feature-lookups.md); either way nothing from the future comes back for it.
    early = frame[frame["event_timestamp"] == day1_last - timedelta(hours=1)]
    assert early["item_seq"].isna().all()


def _materialize_both_days(store: FeatureStore, features_dir: Path) -> None:
    """A backfill window: each entity gets its latest row of DAY1..DAY2."""
    register(store, features_dir)
    assert materialize_window(store, features_dir, DAY1, DAY2)["user_behavior_sequences"] == 3


def test_redis_online_store(features_dir: Path, tmp_path: Path) -> None:
    require_service("127.0.0.1", 6379)
    config = StoreConfig(
        repo_dir=tmp_path / "feast",
        project=f"grank_test_{uuid.uuid4().hex[:8]}",
        online_store="redis",
    )
    store = open_store(config)
    try:
        _materialize_both_days(store, features_dir)
        found = online_sequences(store, [1, 3, 999])
        assert found[1]["item_seq"] == sequence_of(1, DAY2)  # type: ignore[index]
        assert found[3]["item_seq"] == sequence_of(3, DAY1)  # type: ignore[index]
        assert found[999] is None
        import redis

        assert redis.Redis(host="127.0.0.1", port=6379).dbsize() > 0
    finally:
        store.teardown()


@contextlib.contextmanager
def own_postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL (SQLAlchemy URL), dropped afterwards."""
    require_service("127.0.0.1", 5432)
    import psycopg

    name = f"grank_feast_{uuid.uuid4().hex[:8]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh database for the SQL registry, dropped afterwards."""
    with own_postgres_database() as url:
        yield url


def test_sql_registry_on_postgres(
    features_dir: Path, tmp_path: Path, postgres_database: str
) -> None:
    config = StoreConfig(
        repo_dir=tmp_path / "feast", registry="sql", registry_sql_url=postgres_database
    )
    _materialize_both_days(open_store(config), features_dir)
    reopened = open_store(config)  # a second process' view: everything comes from PostgreSQL
    assert {s.name for s in reopened.list_feature_services()} == set(FEATURE_SERVICES)
    assert not (tmp_path / "feast" / "registry.db").exists()
    assert online_sequences(reopened, [2])[2]["item_seq"] == sequence_of(2, DAY2)  # type: ignore[index]


def test_feasts_own_materialize_refuses_lookups_meanwhile(tmp_path: Path) -> None:
    """Why materialize_window exists: Feast 0.67's materialize() blocks concurrent reads.

    The gate only bites once a view has been through Feast's materialize (its state is
    then AVAILABLE_ONLINE <-> MATERIALIZING); materialize_window never changes the state.

    If this starts failing, Feast no longer gates reads of a MATERIALIZING view (issue
    6780 fixed by default): the write-path design can then be revisited.
    """
    import threading

    features_dir = tmp_path / "features"
    users = list(range(1, 601))
    for day in (DAY1, DAY2):
        write_feature_tables(features_dir, day, users)
    config = StoreConfig(repo_dir=tmp_path / "feast")
    writer = open_store(config)
    register(writer, features_dir)
    writer.materialize(*day_window(DAY1))  # the view leaves STATE_UNSPECIFIED for good
    reader = open_store(config)  # another process' view of the same registry
    refused: list[str] = []
    done = threading.Event()

    def lookups() -> None:
        while not done.is_set():
            try:
                reader.refresh_registry()  # what a server does every cache_ttl_seconds
                reader.get_online_features(
                    features=["user_behavior_sequences:item_seq"], entity_rows=[{"user_id": 1}]
                )
            except Exception as exc:  # the file registry can also be caught mid-rewrite
                refused.append(str(exc))
            time.sleep(0.01)

    thread = threading.Thread(target=lookups)
    thread.start()
    try:
        writer.materialize(*day_window(DAY2))
    finally:
        done.set()
        thread.join()
    assert any("is in state 'MATERIALIZING'" in message for message in refused), refused[:3]
