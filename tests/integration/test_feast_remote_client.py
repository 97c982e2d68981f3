"""A stock Feast client (``online_store: type: remote``) reads through the lookup server.

Real ML-100K features: one day built by the real CLI (Spark), registered and materialized
into the embedded stores; `grank features serve` runs on a free port. A team's own
``feature_store.yaml`` (the pipeline's registry, the remote online store pointed at the
server) must get the same values as the SDK reading the store directly.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from grank.cli import cli
from grank.config import Settings
from tests.integration.test_feast_server import lookup_server

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import SparkSession

DAY = date(1998, 3, 30)
UNKNOWN = 10**9


@dataclass
class Stores:
    direct: FeatureStore  # the SDK on the pipeline's own repo folder
    remote: FeatureStore  # a team's stock client, online reads over HTTP
    active_users: list[int]  # users with events on DAY
    idle_users: list[int]  # users known on DAY without events that day
    items: list[int]
    features_dir: Path


@pytest.fixture(scope="module")
def stores(
    tmp_path_factory: pytest.TempPathFactory, ml100k_settings: Settings, spark: SparkSession
) -> Iterator[Stores]:
    from feast import FeatureStore

    root = tmp_path_factory.mktemp("remote_client")
    shutil.copytree(ml100k_settings.lake_dir, root / "lake")
    env = {"GRANK_DATA_ROOT": str(root), "GRANK_DATASET": "ml-100k"}
    for args in (
        ["build", "--date", DAY.isoformat()],  # reuses the module's Spark session
        ["register"],
        ["materialize", "--date", DAY.isoformat()],
    ):
        done = CliRunner().invoke(cli, ["features", *args], env=env, catch_exceptions=False)
        assert done.exit_code == 0, done.output
    partition = f"dt={DAY.isoformat()}"
    active = sorted(
        pq.read_table(root / "features" / "user_behavior_sequences" / partition)[
            "user_id"
        ].to_pylist()
    )
    known = set(
        pq.read_table(root / "features" / "user_features" / partition)["user_id"].to_pylist()
    )
    idle = sorted(known - set(active))
    items = sorted(
        pq.read_table(root / "features" / "item_features" / partition)["item_id"].to_pylist()
    )

    with lookup_server(env, root / "server.log") as url:
        team = root / "team"
        team.mkdir()
        (team / "feature_store.yaml").write_text(
            yaml.safe_dump(
                {
                    "project": "grank",
                    "provider": "local",
                    "registry": str(root / "feast" / "registry.db"),
                    "online_store": {"type": "remote", "path": url},
                    "entity_key_serialization_version": 3,
                }
            )
        )
        yield Stores(
            direct=FeatureStore(repo_path=str(root / "feast")),
            remote=FeatureStore(repo_path=str(team)),
            active_users=active[:5],
            idle_users=idle[:5],
            items=[*items[:3], *items[-3:]],
            features_dir=root / "features",
        )


def _comparable(value: Any) -> Any:
    """A UnixTimestamp as epoch seconds: Feast 0.67's remote client returns the JSON integer
    the server sends (as with `feast serve`); every other type reads back identical."""
    if isinstance(value, datetime):
        return int(value.replace(tzinfo=value.tzinfo or UTC).timestamp())
    return value


def _rows(store: FeatureStore, features: Any, entity_rows: list[dict[str, int]]) -> dict:
    answer = store.get_online_features(features=features, entity_rows=entity_rows).to_dict()
    return {name: [_comparable(v) for v in values] for name, values in answer.items()}


@pytest.mark.parametrize("service", ["user_profile_v1", "grank_ranker_v1", "grank_generator_v1"])
def test_feature_services_read_the_same_through_the_remote_client(
    stores: Stores, service: str
) -> None:
    users = [*stores.active_users, *stores.idle_users, UNKNOWN]
    rows = [{"user_id": user} for user in users]
    direct = _rows(stores.direct, stores.direct.get_feature_service(service), rows)
    remote = _rows(stores.remote, stores.remote.get_feature_service(service), rows)
    assert remote == direct
    # not vacuous: active users have values, the unknown one has none
    values = next(v for name, v in direct.items() if name != "user_id")
    assert all(v is not None for v in values[: len(stores.active_users)]), direct
    assert values[-1] is None


def test_feature_refs_read_the_same_through_the_remote_client(stores: Stores) -> None:
    view = stores.direct.get_feature_view("item_features")
    refs = [f"item_features:{field.name}" for field in view.features]
    rows = [{"item_id": item} for item in [*stores.items, UNKNOWN]]
    direct = _rows(stores.direct, refs, rows)
    assert _rows(stores.remote, refs, rows) == direct
    assert all(title for title in direct["title"][:-1]) and direct["title"][-1] is None


def test_the_remote_clients_writes_are_refused(stores: Stores) -> None:
    user = stores.active_users[0]
    partition = stores.features_dir / "user_features" / f"dt={DAY.isoformat()}"
    row = pq.read_table(partition).to_pandas().query("user_id == @user")
    before = _rows(stores.direct, ["user_features:age"], [{"user_id": user}])
    with pytest.raises(RuntimeError, match=r"403.*read-only lookup server"):
        stores.remote.write_to_online_store("user_features", row.assign(age=99))
    assert _rows(stores.direct, ["user_features:age"], [{"user_id": user}]) == before
