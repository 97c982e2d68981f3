#!/usr/bin/env bash
# Create or update the two pinned environments; a re-run with unchanged pins takes seconds.
#   .venv          app environment (requirements/app.in + app.lock), with this project editable
#   .venv-airflow  Airflow 3.3 (requirements/airflow.in + airflow.lock)
# Each venv stores the sha256 of the files it was built from; a match skips the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

fingerprint() { cat "$@" | sha256sum | cut -d' ' -f1; }

ensure_venv() {  # ensure_venv DIR STAMP_INPUTS... ; returns 0 if up to date
  local dir=$1; shift
  local want; want=$(fingerprint "$@")
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.grank-stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip
  return 1
}

# pip compiles every installed module to bytecode on one core, over half of a fresh
# install; installs skip it and compile_venv compiles on every core instead. Bytecode is
# only a cache: a file that does not compile (a template shipped as .py) costs nothing.
pip_install() {  # pip_install DIR PIP_ARGS...
  local dir=$1; shift
  "$dir/bin/pip" install --quiet --no-compile "$@"
}
compile_venv() {  # compile_venv DIR
  "$1/bin/python" -m compileall -q -j 0 "$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null 2>&1 || true
}

install_app() {
  app_inputs=(requirements/app.in requirements/app.lock pyproject.toml)
  if ensure_venv .venv "${app_inputs[@]}"; then
    say "app environment up to date (.venv)"
    return
  fi
  say "installing the app environment into .venv (first time: ~2 min; torch first, CPU build)"
  # torch first: left to the resolver, an unpinned torch pulls a multi-GB CUDA build.
  pip_install .venv "torch==2.13.0"
  pip_install .venv -r requirements/app.in -c requirements/app.lock
  pip_install .venv --no-deps -e .
  compile_venv .venv
  fingerprint "${app_inputs[@]}" > .venv/.grank-stamp
}

install_airflow() {
  af_inputs=(requirements/airflow.in requirements/airflow.lock)
  if ensure_venv .venv-airflow "${af_inputs[@]}"; then
    say "Airflow environment up to date (.venv-airflow)"
    return
  fi
  say "installing Airflow 3.3 into .venv-airflow"
  pip_install .venv-airflow -r requirements/airflow.in -c requirements/airflow.lock
  compile_venv .venv-airflow
  fingerprint "${af_inputs[@]}" > .venv-airflow/.grank-stamp
}

# The two environments are independent: build them side by side (each install is mostly
# one core's work). A failure in either fails the script; an environment is stamped
# only once its own install has finished.
install_airflow &
airflow_pid=$!
install_app
wait "$airflow_pid"

# System tools some tests drive, from Debian: installed only where missing and apt-get
# runs as root; elsewhere the line below says what will not be tested.
apt_tool() {  # apt_tool COMMAND PACKAGE WHAT_IT_IS_FOR WHAT_HAPPENS_WITHOUT_IT
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $2 (Debian package) $3"
    local apt=(apt-get -o DPkg::Lock::Timeout=300 install -y -q "$2")
    ("${apt[@]}" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && "${apt[@]}" >/dev/null; }) ||
      say "warning: could not install $2; $4"
  else
    say "note: $1 not found; install Debian's $2: $4"
  fi
}

# docker-compose (v1) validates docker-compose.yml offline in the tests; no Docker engine.
apt_tool docker-compose docker-compose "to validate docker-compose.yml" \
  "the compose validation test will fail in CI"
# Headless Chromium opens the data quality report offline (tests/integration/test_quality_report.py).
apt_tool chromium chromium "to open the data quality report in a real browser" \
  "the report's browser tests will be skipped"
