"""The read-only lookup server (`grank features serve`) as other teams see it: real HTTP.

One server process for the module, started by the real CLI on a data root prepared by
`grank features register` and `grank features materialize`; the last test materializes
a new day while lookups run against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from features.config import StoreConfig
from features.feature_store import materialize_day, open_store
from features.lookup_server import WRITE_ENDPOINTS
from grank.cli import cli
from tests.integration.test_feast_store import DAY1, DAY2, sequence_of, write_feature_tables

USERS = 3000  # enough rows that materializing a day takes a few seconds
WATCHED = [1, USERS // 2, USERS]
MAX_ENTITIES = 50  # the server's limits in this module (settings, through the environment)
MAX_BODY_BYTES = 4096
# `import feast` alone takes ~6 s; far more when the machine's cores are shared
STARTUP_TIMEOUT_S = 180


@dataclass
class Server:
    url: str
    root: Path
    client: httpx.Client = field(repr=False)

    def lookup(self, body: Any, **kwargs: Any) -> httpx.Response:
        return self.client.post(f"{self.url}/get-online-features", json=body, **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("feast_server")
    for day in (DAY1, DAY2):
        write_feature_tables(root / "features", day, list(range(1, USERS + 1)))
    env = {
        "GRANK_DATA_ROOT": str(root),
        "GRANK_FEAST__SERVER_MAX_ENTITIES": str(MAX_ENTITIES),
        "GRANK_FEAST__SERVER_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    }
    runner = CliRunner()
    for args in (["register"], ["materialize", "--date", DAY1.isoformat()]):
        result = runner.invoke(cli, ["features", *args], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert (
        f"example lookup user_id=1: seq_len=2, last items {sequence_of(1, DAY1)}" in result.output
    )

    with lookup_server(env, root / "server.log") as url, httpx.Client(timeout=10) as client:
        yield Server(url=url, root=root, client=client)


@contextlib.contextmanager
def lookup_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """`grank features serve` on a free port in a subprocess; yields its URL once healthy."""
    port = _free_port()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "grank", "features", "serve", "--port", str(port)],
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"server not up within {STARTUP_TIMEOUT_S} s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_known_and_unknown_users(server: Server) -> None:
    response = server.lookup(
        {"feature_service": "grank_ranker_v1", "entities": {"user_id": [1, 99999]}}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    names = body["metadata"]["feature_names"]
    assert sorted(names) == ["item_seq", "ts_seq", "user_id"]
    item_seq = body["results"][names.index("item_seq")]
    assert item_seq["values"] == [sequence_of(1, DAY1), None]
    assert item_seq["statuses"] == ["PRESENT", "NOT_FOUND"]


def test_feature_refs_and_item_entities(server: Server) -> None:
    response = server.lookup(
        {
            "features": ["item_features:pop_total", "item_features:title"],
            "entities": {"item_id": [2]},
        }
    )
    assert response.status_code == 200, response.text
    values = {
        name: result["values"][0]
        for name, result in zip(
            response.json()["metadata"]["feature_names"], response.json()["results"], strict=True
        )
    }
    assert values == {"item_id": 2, "pop_total": 3, "title": "Jumanji (1995)"}


@pytest.mark.parametrize("path", WRITE_ENDPOINTS)
def test_write_endpoints_are_refused(server: Server, path: str) -> None:
    body = {
        "feature_view_name": "user_behavior_sequences",
        "df": {"user_id": [1]},
        "start_ts": "2000-01-01",
        "end_ts": "2001-01-01",
    }
    response = server.client.post(f"{server.url}{path}", json=body)
    assert response.status_code == 403
    assert "read-only" in response.json()["detail"]


def test_a_body_without_content_type_is_read_as_json_like_feast_serve(server: Server) -> None:
    body = {"feature_service": "grank_ranker_v1", "entities": {"user_id": [1, 99999]}}
    bare = server.client.post(
        f"{server.url}/get-online-features", content=json.dumps(body).encode()
    )
    assert "content-type" not in bare.request.headers
    assert bare.status_code == 200, bare.text
    assert bare.json() == server.lookup(body).json()


def test_fields_of_newer_clients_are_ignored_and_version_metadata_is_served(
    server: Server,
) -> None:
    """Feast's own remote client sends include_feature_view_version_metadata; later ones more."""
    body = {
        "features": ["user_features:age"],
        "entities": {"user_id": [1]},
        "include_feature_view_version_metadata": True,
        "a_field_from_a_future_client": {"anything": [1, 2]},
    }
    response = server.lookup(body)
    assert response.status_code == 200, response.text
    metadata = response.json()["metadata"]
    assert [view["name"] for view in metadata["feature_view_metadata"]] == ["user_features"]
    plain = server.lookup({"features": ["user_features:age"], "entities": {"user_id": [1]}})
    assert "feature_view_metadata" not in plain.json()["metadata"]
    assert plain.json()["results"] == response.json()["results"]


def test_entities_per_request_are_capped_with_413(server: Server) -> None:
    at_limit = {
        "features": ["user_features:age"],
        "entities": {"user_id": list(range(1, MAX_ENTITIES + 1))},
    }
    assert server.lookup(at_limit).status_code == 200
    over = {
        "features": ["user_features:age"],
        "entities": {"user_id": list(range(1, MAX_ENTITIES + 2))},
    }
    response = server.lookup(over)
    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"too many entities: {MAX_ENTITIES + 1} in one request, the limit is {MAX_ENTITIES};"
        " split the ids over several requests"
    )


def test_request_bodies_are_capped_with_413_declared_or_streamed(server: Server) -> None:
    padding = " " * MAX_BODY_BYTES  # valid JSON, one byte of whitespace at a time
    body = f'{{"features": ["user_features:age"], "entities": {{"user_id": [1]}}{padding}}}'
    declared = server.client.post(
        f"{server.url}/get-online-features",
        content=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert declared.status_code == 413
    assert (
        declared.json()["detail"]
        == f"request body over {MAX_BODY_BYTES:,} bytes: split the request"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(body), 512):
            yield body[start : start + 512].encode()

    streamed = server.client.post(
        f"{server.url}/get-online-features",
        content=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413
    assert server.client.get(f"{server.url}/health").status_code == 200


def test_openapi_docs_describe_the_lookup_body(server: Server) -> None:
    assert server.client.get(f"{server.url}/docs").status_code == 200
    schema = server.client.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/get-online-features"]["post"]["requestBody"]
    properties = body["content"]["application/json"]["schema"]["properties"]
    assert set(properties) == {
        "entities",
        "feature_service",
        "features",
        "full_feature_names",
        "include_feature_view_version_metadata",
    }
    assert str(MAX_ENTITIES) in schema["info"]["description"]


@pytest.mark.parametrize(
    ("kwargs", "status", "detail"),
    [
        (
            {"json": {"features": ["user_features:age"], "entities": {"user_id": ["abc"]}}},
            422,
            "entities.user_id.0",
        ),
        (
            {"json": {"features": ["user_features:age"], "entities": {"user_id": [1.5]}}},
            422,
            "entities.user_id.0",
        ),
        (
            {"json": {"features": ["user_features:age"], "entities": {"customer": [1]}}},
            400,
            "unknown entity key",
        ),
        ({"json": {"features": ["user_features:age"], "entities": {}}}, 400, "entities is empty"),
        (
            {"json": {"features": ["user_features:age"], "entities": {"user_id": []}}},
            400,
            "list is empty",
        ),
        ({"json": {"feature_service": "nope_v9", "entities": {"user_id": [1]}}}, 404, "nope_v9"),
        ({"json": {"features": ["nope:age"], "entities": {"user_id": [1]}}}, 404, "nope"),
        ({"json": {"entities": {"user_id": [1]}}}, 422, "exactly one of"),
        (
            {"json": {"features": ["user_features:age"], "entities": {"user_id": [True]}}},
            422,
            "entities.user_id.0",
        ),
        (
            {
                "json": {
                    "features": ["user_features:age"],
                    "entities": {"user_id": [1, 2], "item_id": [1]},
                }
            },
            400,
            "different lengths",
        ),
        (
            {
                "content": b'{"features": ["user_features:age"], "entities": {"user_id": [1]}}',
                "headers": {"Content-Type": "text/plain"},
            },
            415,
            "Content-Type: application/json",
        ),
        (
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            422,
            "invalid request body",
        ),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(
    server: Server, kwargs: dict[str, Any], status: int, detail: str
) -> None:
    response = server.client.post(f"{server.url}/get-online-features", **kwargs)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert server.client.get(f"{server.url}/health").status_code == 200


def test_lookups_never_fail_while_a_day_is_materialized(server: Server) -> None:
    """Concurrent HTTP lookups during `materialize` of day 2: zero failures, old -> new."""
    old = {u: sequence_of(u, DAY1) for u in WATCHED}
    new = {u: sequence_of(u, DAY2) for u in WATCHED}
    seen: dict[int, list[str]] = {u: [] for u in WATCHED}
    failures: list[str] = []
    during = 0
    done = threading.Event()

    def hammer() -> None:
        nonlocal during
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                try:
                    response = client.post(
                        f"{server.url}/get-online-features",
                        json={
                            "feature_service": "grank_ranker_v1",
                            "entities": {"user_id": WATCHED},
                        },
                    )
                    body = response.json()
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {body}")
                        continue
                    names = body["metadata"]["feature_names"]
                    values = body["results"][names.index("item_seq")]["values"]
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                during += 1
                for user, value in zip(WATCHED, values, strict=True):
                    state = (
                        "old"
                        if value == old[user]
                        else "new"
                        if value == new[user]
                        else repr(value)
                    )
                    seen[user].append(state)

    store = open_store(StoreConfig(repo_dir=server.root / "feast"))
    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        materialize_day(store, server.root / "features", DAY2, batch_rows=100)
        elapsed = time.monotonic() - started
    finally:
        time.sleep(0.5)
        done.set()
        thread.join(timeout=30)
    assert failures == []
    assert during >= 10, f"only {during} lookups in {elapsed:.1f} s of materialization"
    for states in seen.values():
        assert set(states) <= {"old", "new"}, states
        assert states[0] == "old" and states[-1] == "new"
        switch = states.index("new")
        assert set(states[switch:]) == {"new"}  # never back to old once switched
