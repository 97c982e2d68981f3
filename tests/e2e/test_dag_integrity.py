"""The DAG file parses fast and clean in the real Airflow environment, with the agreed shape.

Airflow lives in its own environment (.venv-airflow), so the DagBag is loaded there by a
subprocess that prints one JSON document; nothing of Airflow is imported into the app env.
"""

from __future__ import annotations

import json
import os
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from grank.config import REPO_ROOT

AIRFLOW_PYTHON = REPO_ROOT / ".venv-airflow" / "bin" / "python"
DAG_FILE = REPO_ROOT / "dags" / "grank_daily.py"
HEAVY = ("pyspark", "torch", "feast", "great_expectations", "faiss", "pandas", "pyarrow")
OURS = ("grank", "common", "features", "training", "serving")

PROBE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("grank_daily")
tasks = {
    t.task_id: {
        "upstream": sorted(t.upstream_task_ids),
        "retries": t.retries,
        "retry_exponential_backoff": bool(t.retry_exponential_backoff),
        "operator": type(t).__name__,
        "command": getattr(t, "bash_command", None),
        "outlets": sorted(o.name for o in t.outlets),
        "trigger_rule": str(getattr(t.trigger_rule, "value", t.trigger_rule)),
        "skip_on_exit_code": sorted(getattr(t, "skip_on_exit_code", None) or []),
        "post_execute": getattr(t._post_execute_hook, "__name__", None),
        "on_failure": [type(c).__name__ for c in (t.on_failure_callback or [])],
    }
    for t in dag.tasks
} if dag else {}
print(json.dumps({
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "warnings": {str(k): list(v) for k, v in bag.captured_warnings.items()},
    "parse_seconds": [s.duration.total_seconds() for s in bag.dagbag_stats],
    "dag_ids": bag.dag_ids,
    "tasks": tasks,
    "schedule": repr(dag.timetable) if dag else None,
    "catchup": dag.catchup if dag else None,
    "max_active_runs": dag.max_active_runs if dag else None,
    "default_args": {k: str(v) for k, v in (dag.default_args if dag else {}).items()},
    "modules": sorted({m.split(".")[0] for m in sys.modules}),
}))
"""

CHAIN = [
    "wait_for_raw_partition",
    "validate_raw",
    "build_features",
    "validate_features",
    "register_features",
    "materialize_features",
    "train",
    "evaluate_gate",
    "refresh_embeddings",
    "publish_snapshot",
    "verify_serving",
]
GATES = {"validate_raw", "validate_features", "evaluate_gate"}


def run_probe(home: Path, code: str, folder: Path, **extra_env: str) -> dict[str, Any]:
    """Run ``code`` on a DAG folder in the Airflow environment; its last line is JSON."""
    assert AIRFLOW_PYTHON.exists(), "the Airflow environment is missing: run `make setup`"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GRANK_"))}
    env["AIRFLOW_HOME"] = str(home)
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    done = subprocess.run(
        [str(AIRFLOW_PYTHON), "-c", code, str(folder)],
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The DagBag as the Airflow environment sees it (deployment env vars unset)."""
    return run_probe(tmp_path_factory.mktemp("airflow-home"), PROBE, DAG_FILE.parent)


def test_dagbag_imports_without_errors_or_warnings_of_ours(probe: dict[str, Any]) -> None:
    assert probe["import_errors"] == {}
    assert probe["dag_ids"] == ["grank_daily"]
    # The standard provider's own PythonSensor module warns about a deprecated import;
    # anything raised from our file would name it.
    ours = [w for ws in probe["warnings"].values() for w in ws if str(DAG_FILE) in w]
    assert ours == []


def test_dag_file_parses_fast_without_heavy_or_project_imports(probe: dict[str, Any]) -> None:
    assert probe["parse_seconds"] and max(probe["parse_seconds"]) < 2.0
    loaded = set(probe["modules"])
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)
    assert loaded.isdisjoint(OURS), loaded & set(OURS)


def test_task_graph_is_one_chain_in_pipeline_order(probe: dict[str, Any]) -> None:
    tasks = probe["tasks"]
    assert sorted(tasks) == sorted(CHAIN)
    for upstream, task_id in pairwise(CHAIN):
        assert tasks[task_id]["upstream"] == [upstream], task_id
    assert tasks[CHAIN[0]]["upstream"] == []
    # a refused model (exit 99) is a skipped gate; the snapshot steps run after it and
    # publish nothing new (or popularity, before any model passed); a failure stops them
    after_refusal = {"refresh_embeddings", "publish_snapshot"}
    for task_id, task in tasks.items():
        expected = "none_failed" if task_id in after_refusal else "all_success"
        assert task["trigger_rule"] == expected, task_id
    assert tasks["evaluate_gate"]["skip_on_exit_code"] == [99]


def test_every_step_is_one_grank_command_for_the_logical_date(probe: dict[str, Any]) -> None:
    tasks = probe["tasks"]
    assert tasks["wait_for_raw_partition"]["operator"] == "DecoratedSensorOperator"
    for task_id in CHAIN[1:]:
        command = tasks[task_id]["command"]
        assert tasks[task_id]["operator"] == "BashOperator", task_id
        assert command.count('"${GRANK_BIN:-grank}"') == 1, command
    for task_id in ("validate_raw", "build_features", "train", "evaluate_gate", "publish_snapshot"):
        assert "--date {{ ds }}" in tasks[task_id]["command"], task_id


def test_gates_never_retry_and_transient_steps_back_off(probe: dict[str, Any]) -> None:
    tasks = probe["tasks"]
    for task_id in GATES | {"wait_for_raw_partition"}:
        assert tasks[task_id]["retries"] == 0, task_id
    for task_id in set(CHAIN) - GATES - {"wait_for_raw_partition"}:
        assert tasks[task_id]["retries"] >= 1, task_id
        assert tasks[task_id]["retry_exponential_backoff"], task_id


def test_schedule_and_default_args(probe: dict[str, Any]) -> None:
    assert "CronDataIntervalTimetable" in probe["schedule"]
    assert "'0 0 * * *'" in probe["schedule"] and "UTC" in probe["schedule"]
    assert probe["catchup"] is True
    assert probe["max_active_runs"] == 1
    args = probe["default_args"]
    assert args["owner"] == "grank"
    assert int(args["retries"]) >= 1
    assert args["retry_exponential_backoff"] == "True"
    assert "execution_timeout" in args


def test_assets_for_feature_tables_online_store_and_snapshot(probe: dict[str, Any]) -> None:
    tasks = probe["tasks"]
    assert tasks["validate_features"]["outlets"] == sorted(
        f"grank_{t}"
        for t in ("user_behavior_sequences", "item_features", "user_features", "training_examples")
    )
    assert tasks["materialize_features"]["outlets"] == ["grank_online_features"]
    assert tasks["publish_snapshot"]["outlets"] == ["grank_snapshot"]


def test_nothing_reads_the_clock() -> None:
    source = Path(DAG_FILE).read_text()
    for clock in ("now(", "today(", "utcnow", "time.time"):
        assert clock not in source, clock


def test_publishing_tasks_hand_their_output_to_the_asset_events(probe: dict[str, Any]) -> None:
    tasks = probe["tasks"]
    emitting = {task_id for task_id, task in tasks.items() if task["outlets"]}
    assert emitting == {"validate_features", "materialize_features", "publish_snapshot"}
    for task_id, task in tasks.items():
        assert task["post_execute"] == ("attach_asset_event" if task_id in emitting else None)


def test_failure_notifiers_follow_the_environment(probe: dict[str, Any], tmp_path: Path) -> None:
    assert {str(t["on_failure"]) for t in probe["tasks"].values()} == {"[]"}
    configured = run_probe(
        tmp_path,
        PROBE,
        DAG_FILE.parent,
        GRANK_ALERT_EMAILS="a@example.org, b@example.org",
        GRANK_ALERT_WEBHOOK_URL="http://127.0.0.1:9/hook",
    )
    for task in configured["tasks"].values():
        assert task["on_failure"] == ["SmtpNotifier", "WebhookNotifier"]


CONSUMER_PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "schedules": {
        dag_id: [[a.name, a.uri] for a in dag.timetable.asset_condition.objects]
        for dag_id, dag in bag.dags.items()
    },
}))
"""


def test_the_documented_consumer_dag_is_scheduled_on_a_grank_asset(
    probe: dict[str, Any], tmp_path: Path
) -> None:
    """docs/airflow.md's downstream example parses and listens to an Asset this DAG updates."""
    docs = (REPO_ROOT / "docs" / "airflow.md").read_text()
    blocks = [b for b in docs.split("```python\n")[1:] if "triggering_asset_events" in b]
    assert len(blocks) == 1
    folder = tmp_path / "consumer"
    folder.mkdir()
    (folder / "consumer.py").write_text(blocks[0].split("```")[0])
    loaded = run_probe(tmp_path / "home", CONSUMER_PROBE, folder)
    assert loaded["import_errors"] == {}
    ((name, uri),) = next(iter(loaded["schedules"].values()))
    assert name in {o for t in probe["tasks"].values() for o in t["outlets"]}
    assert uri == f"grank://features/{name.removeprefix('grank_')}"
