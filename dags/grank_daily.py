"""grank_daily: the daily GRank batch for logical date D, one ``grank`` command per task.

Why this shape:

* Thin. Every step is one ``grank`` CLI command of the app environment (``$GRANK_BIN``,
  set by ``scripts/airflow.sh`` or the deployment), run by BashOperator with ``--date {{ ds }}``.
  The DAG imports none of our packages and no heavy library, so it parses in milliseconds,
  and every step can be re-run by hand without Airflow.
* Deterministic. Everything derives from the logical date ``ds`` (the start of the daily data
  interval, so the run for D processes the UTC day D); nothing reads the clock.
* Gates stop the run. A failed quality gate exits non-zero, retries=0, nothing downstream
  runs, and serving keeps the snapshot it already has; the task log names the HTML report.
  A refused model is a skipped ``evaluate_gate`` (exit 99): PUBLISHED stays, and the
  snapshot steps publish nothing new (until a first model passes, they serve popularity).
  Only transient steps (Spark, Feast stores, file publication, the serving check) retry,
  with exponential back-off.
* One run at a time (``max_active_runs=1``): training warm-starts from the model published
  by the previous day, so days must run in order. ``catchup=True`` replays every day from
  the start date once the DAG is unpaused; ``airflow backfill create`` replays a range.
* Downstream teams schedule on the Assets. A publishing command ends its output with one
  JSON line naming what it published (logical date, paths, snapshot version); BashOperator
  keeps that last line as the task's result and :func:`attach_asset_event` hands it to the
  task's Asset events as ``extra``, so a consumer DAG learns the day and the paths from the
  triggering event.
* A failed task is announced (``on_failure_callback``) by e-mail through Airflow's SMTP
  provider and/or to a webhook, whichever the environment configures.

Deployment knobs, read from the environment of the DAG processor and workers:
``GRANK_BIN`` (the grank executable, default ``grank`` on PATH; the sensor asks it whether
a day has landed, ``grank data landed``, so the DAG knows nothing of the lake's layout),
``GRANK_SERVE_URL`` (a running serving API to verify the swap against; unset = skip the
check), ``GRANK_DAG_START_DATE`` (first logical date, default the first day of ML-1M),
``GRANK_DAG_RETRIES`` (retries of transient steps, default 3; tests set 0),
``GRANK_ALERT_EMAILS`` (comma-separated recipients of failure e-mails, sent through the
Airflow connection ``GRANK_ALERT_SMTP_CONN_ID``, default ``smtp_default``, from
``GRANK_ALERT_EMAIL_FROM`` or the connection's ``from_email``), ``GRANK_ALERT_WEBHOOK_URL``
(receives a JSON POST per failed task). Neither set: failures show in the UI only.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import (
    Asset,
    BaseNotifier,
    CronDataIntervalTimetable,
    PokeReturnValue,
    chain,
    dag,
    task,
)

FEATURE_TABLES = ("user_behavior_sequences", "item_features", "user_features", "training_examples")
# Assets other teams' DAGs can schedule on (schedule=[...]); URIs name the contract, not a host.
FEATURE_ASSETS = [
    Asset(name=f"grank_{table}", uri=f"grank://features/{table}") for table in FEATURE_TABLES
]
ONLINE_FEATURES_ASSET = Asset(name="grank_online_features", uri="grank://feast/online")
SNAPSHOT_ASSET = Asset(name="grank_snapshot", uri="grank://snapshots/CURRENT")

START_DATE = datetime.fromisoformat(os.environ.get("GRANK_DAG_START_DATE", "2000-04-25")).replace(
    tzinfo=UTC
)
TRANSIENT_RETRIES = int(os.environ.get("GRANK_DAG_RETRIES", "3"))
RAW_POKE_INTERVAL = timedelta(minutes=5)
RAW_WAIT_TIMEOUT = timedelta(hours=6)
GRANK = '"${GRANK_BIN:-grank}"'
EXIT_REFUSED = 99  # `grank evaluate`: the gate refused the candidate (docs/model.md)
WEBHOOK_TIMEOUT_S = 10


class WebhookNotifier(BaseNotifier):
    """POSTs one JSON document per failed task: a ``text`` line (what Slack-style incoming
    webhooks display) and the fields a receiver can route on."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def notify(self, context: Any) -> None:
        ti = context["ti"]
        exception = context.get("exception")
        payload = {
            "text": f"grank: task {ti.task_id} of {ti.dag_id} failed for {context['ds']}",
            "dag_id": ti.dag_id,
            "task_id": ti.task_id,
            "run_id": ti.run_id,
            "logical_date": context["ds"],
            "try_number": ti.try_number,
            "exception": None if exception is None else str(exception),
            "log_url": getattr(ti, "log_url", None),
        }
        request = urllib.request.Request(
            self.url,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as answer:
            answer.read()


def failure_notifiers() -> list[BaseNotifier]:
    """The notifiers the environment configures (none: failures show in the UI only)."""
    notifiers: list[BaseNotifier] = []
    if emails := os.environ.get("GRANK_ALERT_EMAILS", "").strip():
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        notifiers.append(
            SmtpNotifier(
                to=[address.strip() for address in emails.split(",") if address.strip()],
                from_email=os.environ.get("GRANK_ALERT_EMAIL_FROM") or None,
                smtp_conn_id=os.environ.get("GRANK_ALERT_SMTP_CONN_ID", "smtp_default"),
            )
        )
    if url := os.environ.get("GRANK_ALERT_WEBHOOK_URL", "").strip():
        notifiers.append(WebhookNotifier(url))
    return notifiers


def attach_asset_event(context: Any, result: str | None) -> None:
    """The command's last output line (JSON: the day and the paths it wrote) becomes its
    Asset events' ``extra``. Anything else fails the task: the contract with consumers broke."""
    try:
        extra = json.loads(result or "")
    except json.JSONDecodeError:
        raise ValueError(f"expected the command's last line to be JSON, got {result!r}") from None
    for asset in context["task"].outlets:
        context["outlet_events"][asset].extra = extra


default_args = {
    "owner": "grank",
    "retries": TRANSIENT_RETRIES,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
    "execution_timeout": timedelta(hours=3),
    "on_failure_callback": failure_notifiers(),
}


def grank_step(task_id: str, command: str, *, gate: bool = False, **kwargs: object) -> BashOperator:
    """One task = one ``grank`` command; a gate never retries (its verdict will not change).

    A task with outlets publishes: its command's JSON last line goes to the Asset events.
    """
    if gate:
        kwargs["retries"] = 0
    if kwargs.get("outlets"):
        kwargs["post_execute"] = attach_asset_event
    return BashOperator(task_id=task_id, bash_command=f"{GRANK} {command}", **kwargs)


@task.sensor(
    poke_interval=RAW_POKE_INTERVAL, timeout=RAW_WAIT_TIMEOUT, mode="reschedule", retries=0
)
def wait_for_raw_partition(day: str) -> PokeReturnValue:
    """Done once ``grank data landed --date D`` exits 0: the day's completion marker, which
    producers write last, exists and matches the files (a half-written day keeps waiting)."""
    answer = subprocess.run(
        [os.environ.get("GRANK_BIN", "grank"), "data", "landed", "--date", day],
        capture_output=True,
        text=True,
        check=False,
    )
    print((answer.stdout + answer.stderr).strip())
    return PokeReturnValue(is_done=answer.returncode == 0, xcom_value=answer.stdout.strip())


@dag(
    dag_id="grank_daily",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=START_DATE,
    catchup=True,
    max_active_runs=1,
    default_args=default_args,
    tags=["grank"],
    doc_md=__doc__,
)
def grank_daily() -> None:
    raw_landed = wait_for_raw_partition(day="{{ ds }}")
    validate_raw = grank_step(
        "validate_raw", "features validate --date {{ ds }} --stage raw", gate=True
    )
    build_features = grank_step("build_features", "features build --date {{ ds }}")
    validate_features = grank_step(
        "validate_features",
        "features validate --date {{ ds }} --stage features",
        gate=True,
        outlets=FEATURE_ASSETS,
    )
    register = grank_step("register_features", "features register")
    materialize = grank_step(
        "materialize_features",
        "features materialize --date {{ ds }}",
        outlets=[ONLINE_FEATURES_ASSET],
    )
    train = grank_step("train", "train --date {{ ds }}")
    # a refused model exits 99: the task shows as skipped (not failed: nothing broke) and
    # serving keeps what it has; refresh/publish still run, so a day before any model has
    # passed serves popularity, and otherwise publish finds nothing new to publish
    evaluate = grank_step(
        "evaluate_gate", "evaluate --date {{ ds }}", gate=True, skip_on_exit_code=EXIT_REFUSED
    )
    refresh = grank_step(
        "refresh_embeddings", "embeddings refresh --date {{ ds }}", trigger_rule="none_failed"
    )
    publish = grank_step(
        "publish_snapshot",
        "snapshot publish --date {{ ds }}",
        outlets=[SNAPSHOT_ASSET],
        trigger_rule="none_failed",
    )
    verify = BashOperator(
        task_id="verify_serving",
        # Exit 99 = skipped: no serving API is configured to notify (the embedded default).
        bash_command=(
            'if [ -z "${GRANK_SERVE_URL:-}" ]; then'
            ' echo "GRANK_SERVE_URL is not set: no running server to verify"; exit 99; fi; '
            f'{GRANK} snapshot await-serving --url "$GRANK_SERVE_URL" --timeout 300'
        ),
    )
    chain(
        raw_landed,
        validate_raw,
        build_features,
        validate_features,
        register,
        materialize,
        train,
        evaluate,
        refresh,
        publish,
        verify,
    )


grank_daily()
