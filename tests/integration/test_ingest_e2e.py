"""A team's own CSV export, end to end: ingest → gates → features → Feast → train → snapshot →
/recommend with the team's string ids.

The export is real data (ML-100K, 1998-03-25..04-04) rewritten the way a shop would send
it: string user and item ids, second-resolution timestamps as text, two event types
("view", and "like" for ratings of 4 and up), item and user dimension files with their
own attribute columns. The daily commands run in the DAG's order (dags/grank_daily.py).
"""

from __future__ import annotations

import csv
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow.parquet as pq
from click.testing import CliRunner

from common import idmap
from features.ingest import idmaps_dir
from grank.cli import cli
from serving.sequences import FeastUserSource
from tests.integration.test_serving_app import running_server
from tests.integration.test_training_pipeline import TINY_ENV

FIRST, LAST = date(1998, 3, 25), date(1998, 4, 4)

CONFIG = """\
name: shop-export
events:
  columns: {user_id: customer, item_id: product, timestamp: at, event_type: action, value: stars}
  timestamp: {format: "%Y-%m-%d %H:%M:%S", timezone: UTC}
  types: {view: view, like: like}
values: {min: 1, max: 5}
ids: {user: string, item: string}
behaviors:
  - {name: liked, event_types: [like]}
items:
  id_column: product
  attributes: {title: string, genres: string}
users:
  id_column: customer
  attributes: {age: int32, occupation: string}
"""


def customer(user_id: int) -> str:
    return f"cust-{user_id * 7919:07x}"


def product(item_id: int) -> str:
    return f"film-{item_id:04d}-x"


def export(datasets_dir: Path, out: Path) -> None:
    """One CSV of events per day, plus the catalogue and the customer file."""
    source = datasets_dir / "ml-100k"
    events = pq.read_table(source / "events.parquet").to_pylist()
    by_day: dict[date, list[dict]] = {}
    for row in sorted(events, key=lambda r: (r["timestamp"], r["source_row"])):
        at = datetime.fromtimestamp(row["timestamp"], UTC)
        if FIRST <= at.date() <= LAST:
            by_day.setdefault(at.date(), []).append({**row, "at": at})
    for day, rows in by_day.items():
        with open(out / f"events-{day}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["customer", "product", "at", "action", "stars"])
            for r in rows:
                action = "like" if r["rating"] >= 4 else "view"
                stamp = r["at"].strftime("%Y-%m-%d %H:%M:%S")
                writer.writerow(
                    [customer(r["user_id"]), product(r["item_id"]), stamp, action, r["rating"]]
                )
    with open(out / "catalogue.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product", "title", "genres", "year"])
        for item in pq.read_table(source / "items.parquet").to_pylist():
            writer.writerow([product(item["item_id"]), item["title"], item["genres"], item["year"]])
    with open(out / "customers.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer", "age", "occupation"])
        for user in pq.read_table(source / "users.parquet").to_pylist():
            writer.writerow([customer(user["user_id"]), user["age"], user["occupation"]])


def test_csv_export_with_string_ids_runs_daily_and_serves_string_ids(
    spark, tmp_path: Path, datasets_dir: Path
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    export(datasets_dir, exports)
    config = tmp_path / "shop.yaml"
    config.write_text(CONFIG)
    root = tmp_path / "root"
    env = {**TINY_ENV, "GRANK_DATA_ROOT": str(root)}
    del env["GRANK_DATASET"]  # the lake carries its own dataset config
    runner = CliRunner()

    def grank(*args: str, allowed: tuple[int, ...] = (0,)) -> str:
        result = runner.invoke(cli, list(args), env=env)
        assert result.exit_code in allowed, (args, result.output, result.exception)
        return result.output

    # the history, with the dimension files, then the day the daily commands run for
    before = (LAST - timedelta(days=1)).isoformat()
    grank(
        "data", "ingest", str(exports / "events-*.csv"), "--config", str(config),
        "--from", FIRST.isoformat(), "--to", before,
        "--items", str(exports / "catalogue.csv"), "--users", str(exports / "customers.csv"),
    )  # fmt: skip
    for day in (LAST,):  # one daily run keeps the test short; the DAG tests cover more
        d = day.isoformat()
        out = grank("data", "ingest", str(exports / f"events-{d}.csv"), "--config", str(config),
                    "--date", d)  # fmt: skip
        assert "landed" in out and "in 1 partitions" in out
        grank("features", "validate", "--date", d, "--stage", "raw")
        grank("features", "build", "--date", d)
        grank("features", "validate", "--date", d, "--stage", "features")
        grank("features", "register")
        grank("features", "materialize", "--date", d)
        grank("train", "--date", d)
        grank("evaluate", "--date", d, allowed=(0, 99))
        grank("embeddings", "refresh", "--date", d)
        grank("snapshot", "publish", "--date", d)

    lake_dir = root / "lake"
    items = idmap.load(idmaps_dir(lake_dir), "item")
    users = idmap.load(idmaps_dir(lake_dir), "user")
    assert items is not None and users is not None
    assert items.externals[0].as_py() == product(1)  # the catalogue's order comes first
    item_features = pq.read_table(root / "features" / "item_features" / f"dt={LAST}")
    assert {"title", "genres"} <= set(item_features.column_names)
    assert "year" not in item_features.column_names  # not declared, not landed
    user_features = pq.read_table(root / "features" / "user_features" / f"dt={LAST}")
    assert {"age", "occupation"} <= set(user_features.column_names)

    last_day = pq.read_table(lake_dir / "raw" / "events" / f"dt={LAST}")
    active = users.to_external(last_day["user_id"].to_pylist()[:1])[0]
    assert isinstance(active, str) and active.startswith("cust-")
    source = FeastUserSource(root / "feast")
    with running_server(root, source, source, idmaps_dir=idmaps_dir(lake_dir)) as url:
        answer = httpx.post(f"{url}/recommend", json={"user_id": active, "k": 5}, timeout=60)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["user_id"] == active and body["fallback"] is False
        returned = [item["item_id"] for item in body["items"]]
        assert len(returned) == 5
        assert all(isinstance(i, str) and i.startswith("film-") for i in returned)
        assert set(returned) <= set(items.externals.to_pylist())
        stranger = httpx.post(f"{url}/recommend", json={"user_id": "cust-nobody", "k": 3})
        assert stranger.json()["fallback"] is True
        assert all(i["item_id"].startswith("film-") for i in stranger.json()["items"])
