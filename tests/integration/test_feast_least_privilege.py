"""The compose stack's least privilege, run for real: the lookup server reads through
read-only credentials, and no write gets through them.

Redis: a private ``redis-server`` started with the ``redis`` service's own command line
from docker-compose.yml (its ``--requirepass`` and read-only ``--user``), test passwords
substituted. PostgreSQL: ``docker/postgres/init.sh`` itself, run against the local server
with role names of this test (dropped afterwards). The pipeline registers and
materializes as the owner roles; ``grank features serve`` then runs with the
``feature-server`` service's credentials. The local PostgreSQL trusts every login, so
passwords are not checked here; the privileges of each role are.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from features.config import StoreConfig
from features.feature_store import connect
from grank.cli import cli
from grank.config import REPO_ROOT
from tests.integration.test_feast_server import _free_port, lookup_server
from tests.integration.test_feast_store import (
    DAY1,
    require_service,
    sequence_of,
    write_feature_tables,
)

if TYPE_CHECKING:
    from feast import FeatureStore

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
INIT_SH = REPO_ROOT / "docker" / "postgres" / "init.sh"
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def compose_value(text: str, values: dict[str, str]) -> str:
    """``${NAME:?message}`` (required) and ``${NAME:-default}`` substituted as compose does."""

    def substitute(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        return values.get(name, rest) if kind == "-" else values[name]

    return re.sub(r"\$\{(\w+)(?::([?-])([^}]*))?\}", substitute, text)


def feast_environment(service: str, values: dict[str, str]) -> dict[str, str]:
    """The ``GRANK_FEAST__*`` settings a compose service runs with."""
    env = COMPOSE["services"][service]["environment"]
    return {
        key: compose_value(str(value), values)
        for key, value in env.items()
        if key.startswith("GRANK_FEAST__")
    }


@dataclass
class Stack:
    secrets: dict[str, str]  # the .env of this test
    redis_port: int
    redis_pid: int
    feast_db: str  # owner role and database of the registry
    reader_role: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing and CI is set")
        pytest.skip("redis-server is not installed")
    require_service("127.0.0.1", 5432)
    values = {
        name: secrets.token_urlsafe(12)
        for name in (
            "REDIS_PASSWORD",
            "FEAST_READER_REDIS_PASSWORD",
            "AIRFLOW_DB_PASSWORD",
            "FEAST_DB_PASSWORD",
            "FEAST_READER_DB_PASSWORD",
        )
    }
    prefix = f"grank_lp_{secrets.token_hex(4)}"
    roles = {
        "AIRFLOW_DB_USER": f"{prefix}_airflow",
        "FEAST_DB_USER": f"{prefix}_feast",
        "FEAST_READER_DB_USER": f"{prefix}_reader",
    }
    folder = tmp_path_factory.mktemp("redis")
    port = _free_port()
    command = [compose_value(arg, values) for arg in COMPOSE["services"]["redis"]["command"]]
    assert command[0] == "redis-server"
    local = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    redis = subprocess.Popen(
        [binary, *command[1:], *local, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    init_env = {
        **os.environ,
        **values,
        **roles,
        "POSTGRES_USER": "postgres",
        "PGHOST": "127.0.0.1",
        "PGPORT": "5432",
    }
    try:
        done = subprocess.run(
            ["bash", str(INIT_SH)], env=init_env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert redis.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)
        yield Stack(values, port, redis.pid, roles["FEAST_DB_USER"], roles["FEAST_READER_DB_USER"])
    finally:
        redis.terminate()
        redis.wait(timeout=10)
        _drop(roles)


def _drop(roles: dict[str, str]) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        for role in (roles["AIRFLOW_DB_USER"], roles["FEAST_DB_USER"]):
            conn.execute(f'DROP DATABASE IF EXISTS "{role}" WITH (FORCE)')
        for role in roles.values():
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def _feast_env(stack: Stack, service: str, root: Path) -> dict[str, str]:
    """The Feast settings of a compose service, pointed at this test's Redis and database."""
    from sqlalchemy.engine import make_url

    env = feast_environment(service, stack.secrets)
    registry = make_url(env["GRANK_FEAST__REGISTRY_SQL_URL"])
    assert (registry.host, registry.database) == ("postgres", "feast")
    role = {"feast": stack.feast_db, "feast_reader": stack.reader_role}[str(registry.username)]
    local = registry.set(host="127.0.0.1", database=stack.feast_db, username=role)
    redis = env["GRANK_FEAST__REDIS_CONNECTION_STRING"]
    assert redis.startswith("redis:6379,")
    return {
        **env,
        "GRANK_DATA_ROOT": str(root),
        "GRANK_FEAST__REDIS_CONNECTION_STRING": redis.replace(
            "redis:6379", f"127.0.0.1:{stack.redis_port}", 1
        ),
        "GRANK_FEAST__REGISTRY_SQL_URL": local.render_as_string(hide_password=False),
        "GRANK_FEAST__SERVER_HOST": "127.0.0.1",
    }


def _store(env: dict[str, str], repo_dir: Path) -> FeatureStore:
    """The store a service's settings describe, opened without writing a file."""
    return connect(
        StoreConfig(
            repo_dir=repo_dir,
            online_store="redis",
            redis_connection_string=env["GRANK_FEAST__REDIS_CONNECTION_STRING"],
            registry="sql",
            registry_sql_url=env["GRANK_FEAST__REGISTRY_SQL_URL"],
        )
    )


def test_the_lookup_server_reads_through_read_only_credentials_and_nothing_writes(
    stack: Stack, tmp_path: Path
) -> None:
    write_feature_tables(tmp_path / "features", DAY1, [1, 2, 3])
    pipeline = _feast_env(stack, "airflow-scheduler", tmp_path)
    server = _feast_env(stack, "feature-server", tmp_path)
    assert "username=feast_reader" not in pipeline["GRANK_FEAST__REDIS_CONNECTION_STRING"]
    assert "username=feast_reader" in server["GRANK_FEAST__REDIS_CONNECTION_STRING"]
    assert f"//{stack.reader_role}:" in server["GRANK_FEAST__REGISTRY_SQL_URL"]

    for args in (["register"], ["materialize", "--date", DAY1.isoformat()]):
        done = CliRunner().invoke(cli, ["features", *args], env=pipeline, catch_exceptions=False)
        assert done.exit_code == 0, done.output
    # the pipeline's store file holds its passwords: owner-only
    store_file = tmp_path / "feast" / "feature_store.yaml"
    assert stack.secrets["REDIS_PASSWORD"] in store_file.read_text()
    assert store_file.stat().st_mode & 0o777 == 0o600
    files_before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    with lookup_server(server, tmp_path / "server.log") as url:
        answer = httpx.post(
            f"{url}/get-online-features",
            json={"feature_service": "grank_ranker_v1", "entities": {"user_id": [1, 99]}},
            timeout=10,
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    values = body["results"][body["metadata"]["feature_names"].index("item_seq")]["values"]
    assert values == [sequence_of(1, DAY1), None]
    # the server wrote no file (not even feature_store.yaml) and holds no secret on disk
    log = tmp_path / "server.log"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p != log} == (
        files_before
    )
    reader_secrets = (
        stack.secrets["FEAST_READER_REDIS_PASSWORD"],
        stack.secrets["FEAST_READER_DB_PASSWORD"],
    )
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert not any(s.encode() in path.read_bytes() for s in reader_secrets), path

    # the same credentials cannot write: not the online store ...
    from redis.exceptions import NoPermissionError

    reader = _store(server, tmp_path / "reader")
    row = pq.read_table(tmp_path / "features" / "user_features" / f"dt={DAY1}").to_pandas()
    later = row.head(1).assign(age=99)  # newer than the stored row: Feast would write it
    later["event_timestamp"] += pd.Timedelta(days=1)
    later["created"] += pd.Timedelta(days=1)
    with pytest.raises(NoPermissionError):
        reader.write_to_online_store("user_features", later)
    # ... nor the registry
    import psycopg
    from psycopg.errors import InsufficientPrivilege

    reader_dsn = server["GRANK_FEAST__REGISTRY_SQL_URL"].replace("+psycopg", "")
    for statement in (
        "DELETE FROM feature_views",
        "UPDATE feature_services SET last_updated_timestamp = 0",
        "CREATE TABLE intruder (x int)",
        "DROP TABLE entities",
    ):
        with psycopg.connect(reader_dsn) as conn, pytest.raises(InsufficientPrivilege):
            conn.execute(statement)
    owner = _store(pipeline, tmp_path / "feast")
    ages = owner.get_online_features(["user_features:age"], [{"user_id": 1}]).to_dict()
    assert ages["age"] == [25]  # unchanged


def test_redis_keeps_its_passwords_out_of_the_process_list(stack: Stack) -> None:
    cmdline = Path(f"/proc/{stack.redis_pid}/cmdline").read_bytes()
    for name in ("REDIS_PASSWORD", "FEAST_READER_REDIS_PASSWORD"):
        assert stack.secrets[name].encode() not in cmdline


def test_a_world_readable_store_file_is_made_private(stack: Stack, tmp_path: Path) -> None:
    """A feature_store.yaml written before files were private is fixed on the next open."""
    write_feature_tables(tmp_path / "features", DAY1, [1])
    pipeline = _feast_env(stack, "airflow-scheduler", tmp_path)
    store_file = tmp_path / "feast" / "feature_store.yaml"
    for _ in range(2):
        done = CliRunner().invoke(cli, ["features", "register"], env=pipeline)
        assert done.exit_code == 0, done.output
        assert store_file.stat().st_mode & 0o777 == 0o600
        store_file.chmod(0o644)
