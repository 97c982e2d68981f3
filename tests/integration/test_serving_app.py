"""The serving API over a real HTTP server on loopback: correctness, validation, hot swap, load."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from common.atomic import atomic_write_text
from serving.app import ServeConfig, create_app
from serving.bundle import EMBEDDINGS_FILE
from serving.sequences import ItemSource, StaticUserSource, UserHistory, UserSource
from serving.snapshots import (
    CURRENT,
    point_current,
    read_current,
    rollback_target,
    version_sequence,
)
from tests.integration.test_snapshots import N_ITEMS, make_refresh, publish
from training.checkpoint import load_checkpoint

HISTORIES = {
    1: UserHistory(short=(5, 6, 7), long=(1, 2, 3, 5, 6, 7)),
    2: UserHistory(short=(100, 200), long=(100, 200)),
    3: UserHistory(short=(), long=()),
}
for _user in range(10, 60):
    HISTORIES[_user] = UserHistory(short=(_user, _user + 1), long=(_user, _user + 1, _user + 2))


class SlowSource(StaticUserSource):
    """A lookup that takes a while, so requests pile up behind it (back-pressure test)."""

    def get(
        self, user_ids: Sequence[int], user_columns: Sequence[str] = ()
    ) -> dict[int, UserHistory | None]:
        time.sleep(0.2)
        return super().get(user_ids, user_columns)


@contextmanager
def running_server(
    root: Path,
    source: UserSource | None = None,
    items: ItemSource | None = None,
    **knobs: object,
) -> Iterator[str]:
    """A uvicorn server on a free loopback port in a thread; yields its base URL."""
    config = ServeConfig(
        snapshots_dir=root / "snapshots", device="cpu", k1=50, poll_s=0.05, **knobs
    )  # type: ignore[arg-type]
    app = create_app(config, source or StaticUserSource(HISTORIES), items)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for_version(url: str, version: str, timeout: float = 10.0) -> float:
    """Seconds until ``url`` serves ``version`` (fails the test after ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        answer = httpx.get(f"{url}/version")
        if answer.status_code == 200 and answer.json()["version"] == version:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{url} did not serve {version} within {timeout}s")


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        time.sleep(0.02)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    publish(tmp_path, make_refresh(tmp_path, seed=1))
    return tmp_path


def expected_top(root: Path, version: str, user: int, k: int, k1: int = 50) -> list[int]:
    """Generate → exact top-k1 unseen → Rank → top k, computed directly from the checkpoint."""
    manifest = json.loads((root / "snapshots" / version / "manifest.json").read_text())
    model, _ = load_checkpoint(root / "checkpoints" / manifest["checkpoint_id"])
    history = HISTORIES[user]
    seen = set(history.long) | set(history.short)
    with torch.inference_mode():
        query = model.user_vectors(torch.tensor([[0] * 5 + list(history.short)]))[0]
        scores = model.item_vectors()[1:] @ query
        order = [int(i) + 1 for i in torch.argsort(scores, descending=True)]
        candidates = [i for i in order if i not in seen][:k1]
        cands = torch.tensor([candidates])
        base = model.generator_scores(query[None], cands)
        ranked = model.rank_scores(torch.tensor([list(history.long)]), cands, base)
    return [candidates[int(j)] for j in torch.argsort(ranked[0], descending=True)[:k]]


def test_recommend_runs_generate_mips_rank_and_filters_seen_items(root: Path) -> None:
    version = read_current(root / "snapshots")
    assert version is not None
    with running_server(root) as url:
        assert httpx.get(f"{url}/ready").json() == {"status": "ready", "snapshot_version": version}
        answer = httpx.post(f"{url}/recommend", json={"user_id": 1, "k": 5})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["snapshot_version"] == version and body["fallback"] is False
        items = [item["item_id"] for item in body["items"]]
        assert items == expected_top(root, version, user=1, k=5)
        assert not set(items) & set(HISTORIES[1].long)
        scores = [item["score"] for item in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert set(body["timings_ms"]) == {"lookup", "generator", "mips", "ranker", "total"}
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/version").json()["item_count"] == N_ITEMS


def test_unknown_users_get_the_popular_fallback(root: Path) -> None:
    with running_server(root) as url:
        body = httpx.post(f"{url}/recommend", json={"user_id": 999_999, "k": 3}).json()
        assert body["fallback"] is True
        assert body["fallback_reason"] == "unknown user: the most popular items"
        assert [i["item_id"] for i in body["items"]] == [N_ITEMS, N_ITEMS - 1, N_ITEMS - 2]
        empty = httpx.post(f"{url}/recommend", json={"user_id": 3, "k": 3}).json()
        assert empty["fallback"] is False and len(empty["items"]) == 3


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": 1, "k": 0},
        {"user_id": 1, "k": 101},
        {"user_id": "1", "k": 5},
        {"user_id": "abc"},
        {"user_id": 1.5},
        {"user_id": True},
        {"user_id": -1},
        {"user_id": 2**70},
        {"user_id": 1, "k": 5, "extra": 1},
        {"k": 5},
        [],
        None,
    ],
)
def test_bad_requests_get_a_clear_4xx(root: Path, body: object) -> None:
    with running_server(root) as url:
        answer = httpx.post(f"{url}/recommend", json=body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"]
        assert httpx.post(f"{url}/recommend", content=b"{not json").status_code == 422
        assert httpx.post(f"{url}/recommend", json={"user_id": 1}).status_code == 200


def test_not_ready_until_a_verified_snapshot_appears(tmp_path: Path) -> None:
    with running_server(tmp_path) as url:
        assert httpx.get(f"{url}/ready").status_code == 503
        refused = httpx.post(f"{url}/recommend", json={"user_id": 1})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        version = publish(tmp_path, make_refresh(tmp_path, seed=1))
        wait_for_version(url, version)
        assert httpx.get(f"{url}/ready").status_code == 200


def test_load_during_two_publishes_has_zero_failures_and_versions_only_move_forward(
    root: Path,
) -> None:
    sources = [make_refresh(root, seed=2), make_refresh(root, seed=3)]
    failures: list[str] = []
    seen_versions: list[list[str]] = [[] for _ in range(4)]
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                user = 10 + (index * 7 + len(seen_versions[index])) % 50
                answer = http.post(f"{url}/recommend", json={"user_id": user, "k": 10})
                if answer.status_code != 200 or len(answer.json()["items"]) != 10:
                    failures.append(f"{answer.status_code} {answer.text}")
                else:
                    seen_versions[index].append(answer.json()["snapshot_version"])

    with running_server(root) as url:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        published = [read_current(root / "snapshots")]
        for source in sources:
            # every published version is answered to the clients before the next one goes
            # out (waiting on what they saw, not on a sleep that a loaded machine outruns)
            wait_until(lambda: all(published[-1] in seen for seen in seen_versions))
            version = publish(root, source)
            published.append(version)
            wait_for_version(url, version)
        wait_until(lambda: all(published[-1] in seen for seen in seen_versions))
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
        batch_sizes = httpx.get(f"{url}/metrics").text
    assert failures == []
    for versions in seen_versions:
        assert versions and set(versions) <= set(published)
        sequence = [version_sequence(v) for v in versions]
        assert sequence == sorted(sequence)
    assert {v for vs in seen_versions for v in vs} == set(published)
    assert "grank_batch_size_count" in batch_sizes


def test_a_corrupt_new_snapshot_is_refused_and_the_old_one_keeps_serving(root: Path) -> None:
    snapshots = root / "snapshots"
    old = read_current(snapshots)
    assert old is not None
    with running_server(root) as url:
        # publish a second version but damage it before pointing CURRENT at it ourselves
        new = publish(root, make_refresh(root, seed=2))
        wait_for_version(url, new)
        atomic_write_text(snapshots / CURRENT, old + "\n")
        wait_for_version(url, old)
        matrix = snapshots / new / EMBEDDINGS_FILE
        data = bytearray(matrix.read_bytes())
        data[-3] ^= 0x10
        matrix.write_bytes(bytes(data))
        atomic_write_text(snapshots / CURRENT, new + "\n")
        time.sleep(0.5)
        assert httpx.get(f"{url}/version").json()["version"] == old
        assert httpx.post(f"{url}/recommend", json={"user_id": 1}).json()["snapshot_version"] == old
        metrics = httpx.get(f"{url}/metrics").text
        assert 'grank_snapshot_loads_total{result="failed"} 1.0' in metrics
        assert f'grank_snapshot_info{{version="{old}"}} 1.0' in metrics


def test_rollback_is_served_within_seconds(root: Path) -> None:
    first = read_current(root / "snapshots")
    assert first is not None
    with running_server(root) as url:
        second = publish(root, make_refresh(root, seed=2))
        wait_for_version(url, second)
        assert point_current(root / "snapshots", rollback_target(root / "snapshots")) == first
        assert wait_for_version(url, first) < 2.0


def test_a_full_queue_answers_503_with_retry_after_never_500(root: Path) -> None:
    with running_server(root, SlowSource(HISTORIES), max_batch=1, max_queue=1) as url:
        with httpx.Client(timeout=30) as http:
            codes: list[int] = []
            retry_after: set[str] = set()

            def call(user: int) -> None:
                answer = http.post(f"{url}/recommend", json={"user_id": user})
                codes.append(answer.status_code)
                if answer.status_code == 503:
                    retry_after.add(answer.headers["Retry-After"])

            threads = [threading.Thread(target=call, args=(10 + i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        metrics = httpx.get(f"{url}/metrics").text
    assert set(codes) == {200, 503} and retry_after == {"1"}
    assert "grank_rejected_requests_total" in metrics


def test_concurrent_requests_are_micro_batched_and_metrics_are_exported(root: Path) -> None:
    with running_server(root, SlowSource(HISTORIES), max_wait_ms=20.0) as url:
        sizes: list[int] = []

        def call(user: int) -> None:
            answer = httpx.post(f"{url}/recommend", json={"user_id": user}, timeout=30)
            sizes.append(answer.json()["batch_size"])

        threads = [threading.Thread(target=call, args=(10 + i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = httpx.get(f"{url}/metrics").text
    assert max(sizes) > 1
    for needle in (
        'grank_stage_latency_seconds_bucket{le="0.001",stage="mips"}',
        'grank_requests_total{endpoint="/recommend",status="200"} 12.0',
        "grank_snapshot_age_seconds",
        'grank_snapshot_loads_total{result="ok"} 1.0',
        "grank_mips_screen_rescans 0.0",
    ):
        assert needle in metrics
    age = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("grank_snapshot_age_seconds ")
    )
    assert 0 <= age < 600 and np.isfinite(age)


def test_cli_await_serving_and_recommend_talk_to_a_running_server(root: Path) -> None:
    from click.testing import CliRunner

    from grank.cli import cli

    env = {"GRANK_DATA_ROOT": str(root), "GRANK_DATASET": "ml-100k"}
    runner = CliRunner()
    with running_server(root) as url:
        served = runner.invoke(cli, ["snapshot", "await-serving", "--url", url], env=env)
        assert served.exit_code == 0 and "serves snapshot 000001-2000-12-31" in served.output
        shown = runner.invoke(
            cli, ["recommend", "--user-id", "1", "-k", "3", "--url", url], env=env
        )
        assert shown.exit_code == 0, shown.output
        assert "personalised, snapshot 000001-2000-12-31" in shown.output
        assert len([line for line in shown.output.splitlines() if ". " in line]) == 3
        wait = ["snapshot", "await-serving", "--url", url, "--timeout", "0.5"]
        late = runner.invoke(cli, [*wait, "--version", "000002-2000-12-31"], env=env)
        assert late.exit_code != 0
        assert "did not serve 000002-2000-12-31" in str(late.exception)
