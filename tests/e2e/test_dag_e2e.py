"""The real DAG, run by the real Airflow 3.3 on ML-100K days, end to end.

One data root ("A") runs two consecutive days one by one with ``airflow dags test`` on
the production Feast stores (the Redis online store and the SQL registry in PostgreSQL
of this machine, in a database and a Feast project of its own, removed afterwards), a
real ``grank serve`` following its snapshots (so the last task verifies a real swap) and
a real lookup server answering lookups throughout the second day's run (none may fail
while it materializes), and its Asset events must carry the day and the published
paths; then an injected bad raw partition must stop at the gate and be announced
(webhook and e-mail, to receivers run by the test); then a re-run of a day must
reproduce its outputs. A second root ("B") runs the same days as one ``airflow backfill
create`` through a real scheduler (``airflow standalone``) on the embedded stores and
must equal root A.

Airflow is driven as a subprocess of its own environment (scripts/airflow.sh); state is
read back from its sqlite metadata database.

Cost: every DAG run is eleven processes with their own imports (Spark, GX, Feast, torch),
1.5-4 minutes on two cores. The one-by-one days and the bad day always run; the re-run
and the backfill add three more runs and a scheduler, so they run with GRANK_E2E_FULL=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import socket
import socketserver
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.processes import stop_process_group
from features import lake
from grank.config import REPO_ROOT, Settings
from tests.e2e.test_dag_integrity import CHAIN
from tests.integration.test_feast_server import lookup_server
from tests.integration.test_feast_store import own_postgres_database, require_service

# the module fixture runs two DAG days and a bad day (10-15 min on two shared cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

AIRFLOW_SH = REPO_ROOT / "scripts" / "airflow.sh"
GRANK_BIN = REPO_ROOT / ".venv" / "bin" / "grank"
DAG_ID = "grank_daily"
DAY_1, DAY_2, BAD_DAY = date(1998, 3, 30), date(1998, 3, 31), date(1998, 4, 1)
# History starts here: a month of history is plenty for the DAG's mechanics and keeps the
# bootstrap build short.
FIRST_DAY = date(1998, 3, 1)
# A tiny, deterministic model (no wall-clock budget) that the gate lets through whatever
# popularity does (a margin of -1 on N@10, one query is evidence enough): the DAG's
# mechanics are under test here, not the model's quality (tests/unit/test_training_gate.py).
TINY_PIPELINE = {
    "GRANK_TRAIN__DIM": "16",
    "GRANK_TRAIN__N_LAYERS": "1",
    "GRANK_TRAIN__N_HEADS": "1",
    "GRANK_TRAIN__MAX_EPOCHS": "1",
    "GRANK_TRAIN__FINETUNE_MAX_EPOCHS": "1",
    "GRANK_TRAIN__CANDIDATES_PER_ROW": "16",
    "GRANK_TRAIN__K1": "50",
    "GRANK_TRAIN__GATE__BASELINE_MARGIN": "-1.0",
    "GRANK_TRAIN__GATE__MIN_QUERIES": "1",
    "GRANK_SPARK__SHUFFLE_PARTITIONS": "2",
}
full_e2e = pytest.mark.skipif(
    os.environ.get("GRANK_E2E_FULL") != "1",
    reason="three more DAG runs and a scheduler (~10 min): set GRANK_E2E_FULL=1",
)
AFTER_RAW_GATE = CHAIN[CHAIN.index("validate_raw") + 1 :]
FEATURE_TABLES = ("user_behavior_sequences", "item_features", "user_features", "training_examples")
ALERT_EMAIL = "data-team@example.org"
LOOKUP_USERS = [1, 2, 3]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Rig:
    """One Airflow home + one grank data root, and the environment that ties them."""

    home: Path
    settings: Settings
    env: dict[str, str]

    def airflow(
        self, *args: str, timeout: float = 900, **extra_env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(AIRFLOW_SH), *args],
            env={**self.env, **extra_env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def dags_test(self, day: date, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """Run the whole DAG for ``day`` in-process (a re-run replaces the day's run)."""
        return self.airflow("dags", "test", DAG_ID, day.isoformat(), **extra_env)

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.home / "airflow.db")) as db:
            return db.execute(sql, params).fetchall()

    def runs(self, run_type: str) -> dict[str, tuple[str, str]]:
        """logical day -> (run_id, state) of this run type."""
        rows = self.query(
            "SELECT logical_date, run_id, state FROM dag_run WHERE dag_id = ? AND run_type = ?",
            DAG_ID,
            run_type,
        )
        return {str(logical)[:10]: (run_id, state) for logical, run_id, state in rows}

    def task_states(self, run_id: str) -> dict[str, str | None]:
        rows = self.query(
            "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
            DAG_ID,
            run_id,
        )
        return dict(rows)


def make_rig(tmp: Path, source: Settings, **extra_env: str) -> Rig:
    """A fresh data root holding a copy of the ML-100K lake, and its Airflow home."""
    settings = Settings(data_root=tmp / "data", dataset="ml-100k")
    shutil.copytree(
        source.lake_dir,
        settings.lake_dir,
        ignore=lambda _, names: [n for n in names if n.startswith("dt=") and n < f"dt={FIRST_DAY}"],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GRANK_"))}
    env.update(
        AIRFLOW_HOME=str(tmp / "airflow"),
        GRANK_BIN=str(GRANK_BIN),
        GRANK_DATA_ROOT=str(settings.data_root),
        GRANK_DATASET="ml-100k",
        GRANK_DAG_START_DATE=FIRST_DAY.isoformat(),
        GRANK_DAG_RETRIES="0",
        SPARK_LOCAL_IP="127.0.0.1",
        **TINY_PIPELINE,
        **extra_env,
    )
    return Rig(tmp / "airflow", settings, env)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every visible file under ``folder``, by relative path (hidden = staging)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.parts)
    }


def current_snapshot(settings: Settings) -> tuple[str, dict[str, Any]]:
    version = (settings.snapshots_dir / "CURRENT").read_text().strip()
    manifest = json.loads((settings.snapshots_dir / version / "manifest.json").read_text())
    return version, manifest


def manifest_content(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a snapshot holds, without when it was made (timestamp, sequence number)."""
    return {k: v for k, v in manifest.items() if k not in {"created_at", "version"}}


def explain(done: subprocess.CompletedProcess[str]) -> str:
    lines = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "error" in line.lower() or "exited with return code" in line or "end task" in line
    ]
    return "\n".join(lines[-60:])


@contextlib.contextmanager
def background(command: list[str], env: dict[str, str], log: Path) -> Iterator[None]:
    """Run ``command`` in its own process group for the block; stop that group afterwards."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield
    finally:
        stop_process_group(process, grace_seconds=30)


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def serve_version(url: str) -> str | None:
    try:
        answer = httpx.get(f"{url}/version", timeout=2.0)
    except httpx.HTTPError:
        return None
    return str(answer.json().get("version")) if answer.status_code == 200 else None


def api_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v2/version", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Alerts:
    """Receivers of the DAG's failure notifiers: a webhook endpoint and an SMTP sink."""

    env: dict[str, str]
    posts: list[dict[str, Any]]
    mails: list[bytes]


class _SmtpSink(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib: every command accepted, each message body kept."""

    def handle(self) -> None:
        self.wfile.write(b"220 sink\r\n")
        body: list[bytes] | None = None
        while line := self.rfile.readline():
            if body is not None:
                if line == b".\r\n":
                    self.server.mails.append(b"".join(body))  # type: ignore[attr-defined]
                    body = None
                    self.wfile.write(b"250 kept\r\n")
                else:
                    body.append(line)
            elif line[:4].upper() == b"DATA":
                body = []
                self.wfile.write(b"354 go on\r\n")
            elif line[:4].upper() == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


class _Webhook(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.server.posts.append(json.loads(self.rfile.read(length)))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()


@pytest.fixture(scope="module")
def alerts() -> Iterator[Alerts]:
    webhook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    smtp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SmtpSink)
    webhook.posts = []  # type: ignore[attr-defined]
    smtp.mails = []  # type: ignore[attr-defined]
    for server in (webhook, smtp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    connection = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": smtp.server_address[1],
        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "grank@example.org"},
    }
    env = {
        "GRANK_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{webhook.server_address[1]}/hook",
        "GRANK_ALERT_EMAILS": ALERT_EMAIL,
        "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(connection),
    }
    try:
        yield Alerts(env, webhook.posts, smtp.mails)  # type: ignore[attr-defined]
    finally:
        for server in (webhook, smtp):
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def production_stores() -> Iterator[dict[str, str]]:
    """Settings of the production Feast stores (docs/deployment.md) on this machine's
    Redis and PostgreSQL: the SQL registry in a database of its own (dropped afterwards)
    and a Feast project of its own, whose Redis keys (they end with the project's name)
    are deleted afterwards."""
    require_service("127.0.0.1", 6379)
    import redis

    project = f"grank_e2e_{uuid.uuid4().hex[:8]}"
    client = redis.Redis(host="127.0.0.1", port=6379)
    with own_postgres_database() as registry_url:
        try:
            yield {
                "GRANK_FEAST__PROJECT": project,
                "GRANK_FEAST__ONLINE_STORE": "redis",
                "GRANK_FEAST__REDIS_CONNECTION_STRING": "127.0.0.1:6379",
                "GRANK_FEAST__REGISTRY": "sql",
                "GRANK_FEAST__REGISTRY_SQL_URL": registry_url,
            }
        finally:
            for key in client.scan_iter(match=f"*{project}", count=1000):
                client.delete(key)
            client.close()


@dataclass
class Lookups:
    """Outcome of lookups sent to the lookup server in a loop: (time, error or None)."""

    outcomes: list[tuple[float, str | None]]
    last_values: list[Any]


@contextlib.contextmanager
def lookups_meanwhile(env: dict[str, str], log: Path) -> Iterator[Lookups]:
    """``grank features serve`` looked up in a loop, in a thread, for the block's duration."""
    result = Lookups([], [])
    done = threading.Event()

    def loop(url: str) -> None:
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                at = time.time()
                try:
                    response = client.post(
                        f"{url}/get-online-features",
                        json={
                            "feature_service": "grank_ranker_v1",
                            "entities": {"user_id": LOOKUP_USERS},
                        },
                    )
                    if response.status_code != 200:
                        result.outcomes.append((at, f"{response.status_code}: {response.text}"))
                        continue
                    body = response.json()
                    names = body["metadata"]["feature_names"]
                    result.last_values = body["results"][names.index("item_seq")]["values"]
                    result.outcomes.append((at, None))
                except httpx.HTTPError as error:
                    result.outcomes.append((at, repr(error)))
                time.sleep(0.2)

    with lookup_server(env, log) as url:
        thread = threading.Thread(target=loop, args=(url,))
        thread.start()
        try:
            yield result
        finally:
            done.set()
            thread.join(timeout=30)


@dataclass
class OneByOne:
    rig: Rig
    serve_url: str
    features: dict[str, str]
    snapshot: tuple[str, dict[str, Any]]
    lookups: Lookups


@pytest.fixture(scope="module")
def one_by_one(
    tmp_path_factory: pytest.TempPathFactory,
    ml100k_settings: Settings,
    alerts: Alerts,
    production_stores: dict[str, str],
) -> Iterator[OneByOne]:
    """Root A: DAY_1 then DAY_2 with ``airflow dags test`` on the production stores; a
    real server follows CURRENT and a lookup server is asked throughout DAY_2's run.

    Failure notifications go to the test's receivers from the start.
    """
    port = _free_port()
    serve_url = f"http://127.0.0.1:{port}"
    rig = make_rig(
        tmp_path_factory.mktemp("dag-a"), ml100k_settings, **alerts.env, **production_stores
    )
    first = rig.dags_test(DAY_1)
    assert first.returncode == 0, explain(first)
    logs = rig.home.parent
    with (
        background([str(GRANK_BIN), "serve", "--port", str(port)], rig.env, logs / "serve.log"),
        lookups_meanwhile(rig.env, logs / "lookups.log") as lookups,
    ):
        wait_until(lambda: serve_version(serve_url), 120, f"grank serve on {serve_url}")
        second = rig.dags_test(DAY_2, GRANK_SERVE_URL=serve_url)
        assert second.returncode == 0, explain(second)
        yield OneByOne(
            rig,
            serve_url,
            tree_digest(rig.settings.features_dir),
            current_snapshot(rig.settings),
            lookups,
        )


def test_two_days_succeed_and_serving_swaps_to_the_new_snapshot(one_by_one: OneByOne) -> None:
    rig = one_by_one.rig
    runs = rig.runs("manual")
    assert {day: state for day, (_, state) in runs.items()} == {
        DAY_1.isoformat(): "success",
        DAY_2.isoformat(): "success",
    }
    # Day 1 had no server to notify (no GRANK_SERVE_URL: skipped); day 2 verified the swap.
    assert rig.task_states(runs[DAY_1.isoformat()][0])["verify_serving"] == "skipped"
    day_2 = rig.task_states(runs[DAY_2.isoformat()][0])
    assert set(day_2.values()) == {"success"}, day_2
    version, manifest = one_by_one.snapshot
    assert version.endswith(DAY_2.isoformat())
    assert manifest["logical_date"] == DAY_2.isoformat()
    assert serve_version(one_by_one.serve_url) == version
    verified = subprocess.run(
        [str(GRANK_BIN), "snapshot", "verify"], env=rig.env, capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stderr
    for day in (DAY_1, DAY_2):
        report = rig.settings.reports_dir / f"dt={day.isoformat()}"
        assert (report / "summary.json").is_file(), sorted(rig.settings.reports_dir.rglob("*"))
        assert list(report.rglob("*.html")), report


def test_production_stores_answer_every_lookup_while_the_day_materializes(
    one_by_one: OneByOne, production_stores: dict[str, str]
) -> None:
    import redis

    rig = one_by_one.rig
    run_id = rig.runs("manual")[DAY_2.isoformat()][0]
    ((started, ended),) = rig.query(
        "SELECT start_date, end_date FROM task_instance"
        " WHERE dag_id = ? AND run_id = ? AND task_id = 'materialize_features'",
        DAG_ID,
        run_id,
    )
    # Airflow keeps UTC times; sqlite returns them as text, without the zone
    window = [datetime.fromisoformat(t).replace(tzinfo=UTC).timestamp() for t in (started, ended)]
    outcomes = one_by_one.lookups.outcomes
    assert [error for _, error in outcomes if error] == []
    during = [at for at, _ in outcomes if window[0] <= at <= window[1]]
    assert len(during) >= 3, (window, len(outcomes))
    assert all(one_by_one.lookups.last_values), one_by_one.lookups.last_values
    # the rows live in Redis under the run's own project, the registry in its own database
    project = production_stores["GRANK_FEAST__PROJECT"]
    client = redis.Redis(host="127.0.0.1", port=6379)
    assert next(client.scan_iter(match=f"*{project}", count=1000), None) is not None
    assert not (rig.settings.feast_dir / "registry.db").exists()


def test_asset_events_carry_the_day_and_what_was_published(one_by_one: OneByOne) -> None:
    rig = one_by_one.rig
    run_id = rig.runs("manual")[DAY_2.isoformat()][0]
    rows = rig.query(
        "SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
        " WHERE e.source_dag_id = ? AND e.source_run_id = ?",
        DAG_ID,
        run_id,
    )
    events = {name: json.loads(extra) for name, extra in rows}
    assert sorted(events) == sorted(
        [*(f"grank_{t}" for t in FEATURE_TABLES), "grank_online_features", "grank_snapshot"]
    )
    day = DAY_2.isoformat()
    for table in FEATURE_TABLES:
        extra = events[f"grank_{table}"]
        assert extra["logical_date"] == day
        partition = rig.settings.features_dir / table / f"dt={day}"
        assert extra["paths"][table] == str(partition) and partition.is_dir()
        assert Path(extra["report"]).is_file()
    online = events["grank_online_features"]
    assert online["logical_date"] == day
    assert online["window_start"] == f"{day}T00:00:00+00:00"
    assert online["rows"]["user_features"] > 0
    version, _ = one_by_one.snapshot
    assert events["grank_snapshot"] == {
        "logical_date": day,
        "changed": True,
        "version": version,
        "path": str(rig.settings.snapshots_dir / version),
    }


def test_bad_raw_partition_fails_at_the_gate_and_keeps_serving(
    one_by_one: OneByOne, alerts: Alerts
) -> None:
    rig = one_by_one.rig
    partition = rig.settings.lake_dir / "raw" / "events" / f"dt={BAD_DAY.isoformat()}"
    events = pq.read_table(partition)
    # every event twice: duplicate event ids are a critical raw-gate failure; landed whole
    # (completion marker included), so the sensor passes and the gate must catch it
    lake.write_partition(rig.settings.lake_dir, BAD_DAY, pa.concat_tables([events, events]))
    snapshots_before = sorted(p.name for p in rig.settings.snapshots_dir.iterdir())

    failed = rig.dags_test(BAD_DAY)

    assert failed.returncode != 0
    run_id, state = rig.runs("manual")[BAD_DAY.isoformat()]
    assert state == "failed"
    states = rig.task_states(run_id)
    assert states["wait_for_raw_partition"] == "success"
    assert states["validate_raw"] == "failed"
    assert {states[t] for t in AFTER_RAW_GATE} == {"upstream_failed"}, states
    # the task log says why and where the report is
    assert "quality gate failed" in failed.stdout + failed.stderr
    assert "report:" in failed.stdout + failed.stderr
    assert sorted(p.name for p in rig.settings.snapshots_dir.iterdir()) == snapshots_before
    assert current_snapshot(rig.settings) == one_by_one.snapshot
    assert serve_version(one_by_one.serve_url) == one_by_one.snapshot[0]
    assert not partition.exists(), "a failed raw partition is moved to quarantine"
    assert list((rig.settings.quarantine_dir).rglob(f"dt={BAD_DAY.isoformat()}"))
    # the failure was announced, once, by both notifiers; the good days announced nothing
    assert [(p["task_id"], p["logical_date"], p["run_id"]) for p in alerts.posts] == [
        ("validate_raw", BAD_DAY.isoformat(), run_id)
    ]
    assert "non-zero exit code 1" in alerts.posts[0]["exception"]
    assert alerts.posts[0]["text"].startswith("grank: task validate_raw of grank_daily failed")
    assert len(alerts.mails) == 1
    assert f"To: {ALERT_EMAIL}".encode() in alerts.mails[0]
    assert b"validate_raw" in alerts.mails[0]


@full_e2e
def test_rerun_of_a_day_reproduces_features_and_snapshot(one_by_one: OneByOne) -> None:
    rig = one_by_one.rig
    again = rig.dags_test(DAY_2, GRANK_SERVE_URL=one_by_one.serve_url)
    assert again.returncode == 0, explain(again)
    assert tree_digest(rig.settings.features_dir) == one_by_one.features
    _, manifest = current_snapshot(rig.settings)
    assert manifest_content(manifest) == manifest_content(one_by_one.snapshot[1])


@full_e2e
def test_backfill_equals_the_days_run_one_by_one(
    one_by_one: OneByOne, tmp_path_factory: pytest.TempPathFactory, ml100k_settings: Settings
) -> None:
    api_port = _free_port()
    rig = make_rig(
        tmp_path_factory.mktemp("dag-b"),
        ml100k_settings,
        AIRFLOW__API__PORT=str(api_port),
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(_free_port()),
        # only the backfill's runs: no catch-up runs from the start date
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
    )
    for args in (("dags", "reserialize"), ("dags", "unpause", DAG_ID)):
        done = rig.airflow(*args, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    log = rig.home.parent / "standalone.log"
    with background([str(AIRFLOW_SH), "standalone"], rig.env, log):
        # tasks queued before the API server listens fail to start: wait for it first
        wait_until(lambda: api_up(f"http://127.0.0.1:{api_port}"), 180, "the Airflow API server")
        created = rig.airflow(
            "backfill",
            "create",
            "--dag-id",
            DAG_ID,
            "--from-date",
            DAY_1.isoformat(),
            "--to-date",
            DAY_2.isoformat(),
            "--max-active-runs",
            "1",
            timeout=120,
        )
        assert created.returncode == 0, created.stderr[-2000:]

        def finished() -> dict[str, str] | None:
            states = {day: state for day, (_, state) in rig.runs("backfill").items()}
            done = len(states) == 2 and all(s in ("success", "failed") for s in states.values())
            return states if done else None

        states = wait_until(finished, 600, "the backfill's two runs")
    assert states == {DAY_1.isoformat(): "success", DAY_2.isoformat(): "success"}, log.read_text()[
        -3000:
    ]
    assert tree_digest(rig.settings.features_dir) == one_by_one.features
    version, manifest = current_snapshot(rig.settings)
    assert version.endswith(DAY_2.isoformat())
    assert manifest_content(manifest) == manifest_content(one_by_one.snapshot[1])
