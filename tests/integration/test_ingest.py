"""`grank data ingest`: dataset configs, id maps, readers, the MovieLens replays on that path."""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from common import idmap
from common.errors import UserFacingError
from features import dataset_config, lake
from features import feature_tables as ft
from features.ingest import dimension_path, idmaps_dir
from grank.cli import cli
from tests.conftest import land_dataset, make_settings

CSV_CONFIG = """
name: shop
events:
  format: csv
  columns: {user_id: customer, item_id: sku, timestamp: ts, event_type: action, value: qty}
  timestamp: {format: "%Y-%m-%d %H:%M:%S", timezone: Europe/Paris}
  types: {view: click, buy: purchase}
values: {min: 0, max: 100}
ids: {user: string, item: string}
behaviors:
  - {name: bought, event_types: [purchase]}
items:
  id_column: sku
  attributes: {brand: string, price: float64}
"""

CSV_ROWS = [
    # customer, sku, ts (Paris local time), action, qty
    ("u-ann", "sku-9", "2024-03-01 00:30:00", "view", ""),  # 2024-02-29 23:30 UTC
    ("u-ann", "sku-2", "2024-03-01 10:00:00", "view", ""),
    ("u-bob", "sku-2", "2024-03-01 10:00:00", "buy", "2"),
    ("u-bob", "sku-7", "2024-03-01 18:15:42", "view", ""),
    ("u-cid", "sku-9", "2024-03-02 09:00:01", "buy", "1"),
]


def write_csv(path: Path, rows: list[tuple[str, ...]]) -> Path:
    lines = ["customer,sku,ts,action,qty", *(",".join(r) for r in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def ingest(root: Path, *args: str) -> tuple[int, str]:
    env = {"GRANK_DATA_ROOT": str(root)}
    result = CliRunner().invoke(cli, ["data", "ingest", *args], env=env)
    error = result.exception
    if error is not None and not isinstance(error, UserFacingError | SystemExit):
        raise error
    return result.exit_code, result.output + (f"error: {error}" if error else "")


def test_config_error_names_every_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: 'has space'\n"
        "events:\n"
        "  columns: {user_id: u, item_id: i}\n"  # timestamp missing
        "  timestamp: {unit: minutes, timezone: Mars/Olympus}\n"
        "  default_type: click\n"
        "values: {min: 5, max: 1}\n"
        "items: {id_column: i, attributes: {pop_total: int64, color: colour}}\n"
        "surprise: 1\n"
    )
    with pytest.raises(UserFacingError) as caught:
        dataset_config.load(bad)
    message = str(caught.value)
    for field in (
        "name:",
        "events.columns.timestamp:",
        "events.timestamp.unit:",
        "events.timestamp.timezone:",
        "values:",
        "items.attributes.color:",
        "surprise:",
    ):
        assert f"  {field}" in message, (field, message)
    reserved = tmp_path / "reserved.toml"
    reserved.write_text(
        'name = "x"\n[events]\ndefault_type = "click"\n'
        '[events.columns]\nuser_id = "u"\nitem_id = "i"\ntimestamp = "t"\n'
        '[items]\nid_column = "i"\nattributes = { pop_total = "int64" }\n'
    )
    with pytest.raises(UserFacingError, match=r"items.attributes: .*reserved"):
        dataset_config.load(reserved)


def test_id_map_is_append_only_and_keeps_its_type(tmp_path: Path) -> None:
    first = idmap.extend(tmp_path, "item", pa.array(["b", "a", "b"]), "string")
    assert first.externals.to_pylist() == ["b", "a"]
    second = idmap.extend(tmp_path, "item", pa.array(["c", "a", "d"]), "string")
    assert second.externals.to_pylist() == ["b", "a", "c", "d"]
    stored = idmap.load(tmp_path, "item")
    assert stored is not None
    assert stored.to_dense(pa.array(["a", "zzz", "d"])).tolist() == [2, 0, 4]
    assert stored.to_external([4, 1, 0, 9]) == ["d", "b", None, None]
    assert stored.dense("c") == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(UserFacingError, match="cannot change"):
        idmap.extend(tmp_path, "item", pa.array([1, 2]), "int64")
    sparse = idmap.extend(tmp_path, "user", pa.array([9_118_338_201_774, 7]), "int64")
    assert sparse.to_dense(pa.array([7, 9_118_338_201_774])).tolist() == [2, 1]


def test_csv_with_string_ids_local_times_and_two_event_types(tmp_path: Path) -> None:
    config = tmp_path / "shop.yaml"
    config.write_text(CSV_CONFIG)
    events = write_csv(tmp_path / "export-2024-03-01.csv", CSV_ROWS)
    items = tmp_path / "catalogue.csv"
    items.write_text("sku,brand,price,ignored\nsku-7,acme,9.5,x\nsku-2,bolt,,y\nsku-1,acme,3,z\n")
    root = tmp_path / "root"

    code, output = ingest(
        root, str(events), "--config", str(config), "--date", "2024-03-01", "--items", str(items)
    )
    assert code == 0, output
    assert "landed 3 events in 1 partitions" in output
    assert "2 events outside the window skipped" in output
    lake_dir = root / "lake"
    landed = lake.read_partition(lake_dir, date(2024, 3, 1))
    assert landed.schema == lake.EVENT_SCHEMA
    # the catalogue's ids come first (file order), then the events' new ones (time order)
    item_map = idmap.load(idmaps_dir(lake_dir), "item")
    assert item_map is not None and item_map.id_type == "string"
    assert item_map.to_external(landed["item_id"].to_pylist()) == ["sku-2", "sku-2", "sku-7"]
    assert item_map.externals.to_pylist()[:3] == ["sku-7", "sku-2", "sku-1"]
    user_map = idmap.load(idmaps_dir(lake_dir), "user")
    assert user_map is not None
    assert user_map.to_external(landed["user_id"].to_pylist()) == ["u-ann", "u-bob", "u-bob"]
    assert landed["event_type"].to_pylist() == ["click", "purchase", "click"]
    assert landed["value"].to_pylist() == [None, 2.0, None]
    # 10:00 in Paris (UTC+1 in March) is 09:00 UTC; equal times keep the file order
    assert landed["event_timestamp"].to_pylist()[:2] == [datetime(2024, 3, 1, 9, tzinfo=UTC)] * 2
    day_index = (date(2024, 3, 1) - lake.EPOCH).days
    assert landed["event_id"].to_pylist() == [day_index << 32 | n for n in range(3)]
    assert set(landed["ingestion_time"].to_pylist()) == {datetime(2024, 3, 2, tzinfo=UTC)}
    catalogue = pq.read_table(dimension_path(lake_dir, "item"))
    assert catalogue.column_names == ["item_id", "brand", "price"]
    assert catalogue["brand"].to_pylist() == ["acme", "bolt", "acme"]
    stored = json.loads((lake_dir / dataset_config.LAKE_CONFIG).read_text())
    assert stored["name"] == "shop"

    # the same day again: the same bytes, the same maps
    part = lake.partition_dir(lake_dir, date(2024, 3, 1)) / "part-00000.parquet"
    before = part.read_bytes()
    code, output = ingest(root, str(events), "--config", str(config), "--date", "2024-03-01")
    assert code == 0, output
    assert part.read_bytes() == before
    reread = idmap.load(idmaps_dir(lake_dir), "item")
    assert reread is not None and reread.externals.to_pylist() == ["sku-7", "sku-2", "sku-1"]

    # the next day: new ids are appended, old ones keep theirs (ids of events outside the
    # landed window, like sku-9's on the 29th, were not mapped)
    code, output = ingest(root, str(events), "--config", str(config), "--date", "2024-03-02")
    assert code == 0, output
    nextday = lake.read_partition(lake_dir, date(2024, 3, 2))
    assert item_map.dense("sku-2") == idmap.load(idmaps_dir(lake_dir), "item").dense("sku-2")  # type: ignore[union-attr]
    assert nextday["user_id"].to_pylist() == [3]  # u-ann, u-bob, then u-cid
    # events of items outside the catalogue are added to it, attributes empty
    catalogue = pq.read_table(dimension_path(lake_dir, "item"))
    assert sorted(catalogue["item_id"].to_pylist()) == [1, 2, 3, 4]


def test_bad_input_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    config = tmp_path / "shop.yaml"
    config.write_text(CSV_CONFIG)
    root = tmp_path / "root"
    bad_type = write_csv(
        tmp_path / "a.csv", [*CSV_ROWS, ("u-dan", "sku-1", "2024-03-01 11:00:00", "refund", "")]
    )
    code, output = ingest(root, str(bad_type), "--config", str(config), "--date", "2024-03-01")
    assert code != 0 and "'refund': 1" in output and "events.types" in output
    bad_time = write_csv(tmp_path / "b.csv", [("u-dan", "sku-1", "01/03/2024 11:00", "view", "")])
    code, output = ingest(root, str(bad_time), "--config", str(config), "--date", "2024-03-01")
    assert code != 0 and "cannot read timestamps of 'ts'" in output
    code, output = ingest(root, str(tmp_path / "none-*.csv"), "--config", str(config), "--all")
    assert code != 0 and "no file matches" in output
    assert not lake.landed_days(root / "lake")
    assert not (root / "lake" / "idmaps" / "item.parquet").exists()


def test_jsonl_with_sparse_int64_ids_and_millisecond_times(tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text(
        'name = "app"\n[ids]\nuser = "int64"\nitem = "int64"\n'
        '[events]\ndefault_type = "click"\n'
        '[events.columns]\nuser_id = "uid"\nitem_id = "iid"\ntimestamp = "at"\n'
        '[events.timestamp]\nunit = "ms"\n'
    )
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"uid": 9118338201774, "iid": 4000000000001, "at": 1709251200123}\n'
        '{"uid": 5, "iid": 4000000000001, "at": 1709251201000, "extra": "x"}\n'
    )
    code, output = ingest(
        tmp_path / "root", str(tmp_path / "*.jsonl"), "--config", str(config), "--all"
    )
    assert code == 0, output
    landed = lake.read_partition(tmp_path / "root" / "lake", date(2024, 3, 1))
    assert landed["user_id"].to_pylist() == [1, 2]
    assert landed["item_id"].to_pylist() == [1, 1]
    assert landed["event_timestamp"][0].as_py() == datetime(2024, 3, 1, 0, 0, 0, 123000, tzinfo=UTC)


def test_ml100k_replay_through_the_config_equals_the_previous_replay(
    spark, tmp_path: Path, datasets_dir: Path
) -> None:
    """Raw partitions and the feature partitions of two days are byte-identical."""
    first, build_days = date(1998, 3, 14), [date(1998, 3, 21), date(1998, 3, 22)]
    before = make_settings(tmp_path / "before")
    land_dataset(before, datasets_dir, first, build_days[-1])
    after = make_settings(tmp_path / "after")
    after.data_root.mkdir()
    os.symlink(datasets_dir, after.datasets_dir)
    env = {"GRANK_DATA_ROOT": str(after.data_root), "GRANK_DATASET": "ml-100k"}
    runner = CliRunner()
    window = ["--from", first.isoformat(), "--to", build_days[-1].isoformat()]
    result = runner.invoke(cli, ["data", "land", *window], env=env)
    assert result.exit_code == 0, result.output
    assert not (after.lake_dir / "idmaps").exists()  # MovieLens ids are used as given

    def files(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*.parquet"))
            if not any(part.startswith(".") for part in p.relative_to(root).parts)
        }

    raw_before = files(lake.events_dir(before.lake_dir))
    assert len(raw_before) == 9 and raw_before == files(lake.events_dir(after.lake_dir))

    for settings in (before, after):
        env["GRANK_DATA_ROOT"] = str(settings.data_root)
        for day in build_days:
            result = runner.invoke(cli, ["features", "build", "--date", day.isoformat()], env=env)
            assert result.exit_code == 0, result.output
    built = files(before.features_dir)
    for table in ft.PUBLIC_TABLES:
        assert any(name.startswith(table) for name in built), table
    assert built == files(after.features_dir)


def test_raw_gate_takes_event_types_and_value_range_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "shop.yaml"
    config.write_text(CSV_CONFIG)
    root = tmp_path / "root"
    rows = [
        ("u-ann", "sku-2", "2024-03-05 10:00:00", "view", ""),
        ("u-bob", "sku-2", "2024-03-05 11:00:00", "buy", "2"),  # "purchase": not a MovieLens type
        ("u-bob", "sku-3", "2024-03-06 11:00:00", "buy", "500"),  # above values.max = 100
    ]
    code, output = ingest(root, str(write_csv(tmp_path / "e.csv", rows)), "--config", str(config),
                          "--all")  # fmt: skip
    assert code == 0, output
    env = {"GRANK_DATA_ROOT": str(root)}
    runner = CliRunner()
    passed = runner.invoke(cli, ["features", "validate", "--date", "2024-03-05"], env=env)
    assert passed.exit_code == 0, (passed.output, passed.exception)
    failed = runner.invoke(cli, ["features", "validate", "--date", "2024-03-06"], env=env)
    assert failed.exit_code != 0
    assert "value" in str(failed.exception)
    assert not lake.partition_dir(root / "lake", date(2024, 3, 6)).exists()  # quarantined
