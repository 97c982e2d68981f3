#!/usr/bin/env bash
# The checkout's embedded Airflow 3.3 (the Airflow environment .venv-airflow).
#
#   scripts/airflow.sh <airflow arguments>    run the airflow CLI, e.g.
#       scripts/airflow.sh dags test grank_daily 2000-12-07
#       scripts/airflow.sh backfill create --dag-id grank_daily --from-date 2000-12-06 --to-date 2000-12-08
#   source scripts/airflow.sh                 only export the environment below
#
# Embedded defaults (every value can be preset by the caller, e.g. a test's own AIRFLOW_HOME):
#   AIRFLOW_HOME .airflow/ in the checkout (git-ignored), sqlite metadata inside it,
#   LocalExecutor, no example DAGs, DAGs from dags/, new DAGs paused, API on 127.0.0.1:8080.
#   GRANK_BIN    the app environment's grank CLI; every DAG task runs "$GRANK_BIN <command>".
# The metadata database is created/migrated on first use (and after an Airflow upgrade).

_grank_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export AIRFLOW_HOME=${AIRFLOW_HOME:-$_grank_repo/.airflow}
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}
export AIRFLOW__CORE__EXECUTOR=${AIRFLOW__CORE__EXECUTOR:-LocalExecutor}
export AIRFLOW__CORE__DAGS_FOLDER=${AIRFLOW__CORE__DAGS_FOLDER:-$_grank_repo/dags}
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-True}
export AIRFLOW__API__HOST=${AIRFLOW__API__HOST:-127.0.0.1}
export AIRFLOW__API__PORT=${AIRFLOW__API__PORT:-8080}
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:$AIRFLOW__API__PORT/execution/}
export GRANK_BIN=${GRANK_BIN:-$_grank_repo/.venv/bin/grank}
# Tasks find the app environment first (grank, and python3 for Spark); `airflow standalone`
# and the executors start further `airflow` processes by name from the Airflow environment.
export PATH="$_grank_repo/.venv/bin:$_grank_repo/.venv-airflow/bin:$PATH"
export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}
export PYTHONUNBUFFERED=1

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  mkdir -p "$AIRFLOW_HOME"
  # One migration per Airflow version: `airflow db migrate` costs seconds even when current.
  stamp="$AIRFLOW_HOME/.migrated-$("$_grank_repo/.venv-airflow/bin/python" -c \
    'import importlib.metadata as m; print(m.version("apache-airflow"))')"
  conn=$AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
  if [[ $conn != sqlite:///* || ! -e ${conn#sqlite:///} || ! -e $stamp ]]; then
    echo "[airflow] migrating the metadata database ($conn)" >&2
    airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 ||
      { cat "$AIRFLOW_HOME/db-migrate.log" >&2; exit 1; }
    touch "$stamp"
  fi
  exec airflow "$@"
fi
