"""Scale run: the feature build on ``local[*]`` against a standalone cluster on this machine.

Usage (results go to docs/benchmarks.md, "Spark feature ETL: local against a standalone
cluster")::

    PYTHONPATH=. .venv/bin/python benchmarks/spark_cluster.py --workdir /tmp/grank-cluster \
        [--events 10000000] [--driver-memory 12g] [--executor-memory 12g]

Generates a synthetic lake once (``grank data synth``: ``--events`` events over
``--days`` days, one user per 50 events), then, per mode, in a data root of its own that
hard-links that lake, times the two CLI runs the DAG makes (each its own process and
JVM, as in production): the full rebuild of the second-to-last day (``grank features
build --date D --rebuild``) and the daily increment of the last day. ``local``:
``GRANK_SPARK__MASTER=local[*]``; ``cluster``: a master and one worker with every core,
started from the pyspark distribution (``features.spark.standalone_cluster``), the
driver in the CLI process. Prints both times per step, the cluster/local ratio, and
whether the two modes' feature tables are byte-identical.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

from features.spark import standalone_cluster

START = date(2024, 1, 1)


def grank(env: dict[str, str], *args: str) -> float:
    """Run one grank command; return its wall time in seconds (fail loudly)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "grank", *args], env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"grank {' '.join(args)} failed:\n{done.stdout}\n{done.stderr[-5000:]}")
    return elapsed


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every visible file under ``folder`` by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.parts)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=300)
    parser.add_argument("--driver-memory", default="12g", help="local[*]: every task's heap")
    parser.add_argument("--executor-memory", default="12g", help="cluster: the executor's heap")
    parser.add_argument("--shuffle-partitions", type=int, default=32)
    args = parser.parse_args()
    cores = os.cpu_count() or 2

    lake_root = args.workdir / "synthetic"
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRANK_")}
    base.update(
        GRANK_DATASET="ml-1m",  # ignored: the synthetic lake carries its own config
        GRANK_SPARK__SHUFFLE_PARTITIONS=str(args.shuffle_partitions),
        SPARK_LOCAL_IP="127.0.0.1",
    )
    if not (lake_root / "lake").exists():
        synth = grank(
            {**base, "GRANK_DATA_ROOT": str(lake_root)},
            *("data", "synth", "--events", str(args.events), "--days", str(args.days)),
            *("--users", str(max(args.events // 50, 1000)), "--items", "10000"),
            *("--start", START.isoformat()),
        )
        print(f"synthetic lake: {args.events:,} events in {synth:.1f} s")
    last = START + timedelta(days=args.days - 1)
    rebuild_day = last - timedelta(days=1)

    times: dict[str, dict[str, float]] = {}
    digests: dict[str, dict[str, str]] = {}
    for mode in ("local", "cluster"):
        root = args.workdir / mode
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        subprocess.run(["cp", "-al", str(lake_root / "lake"), str(root / "lake")], check=True)
        env = {**base, "GRANK_DATA_ROOT": str(root)}
        with (
            standalone_cluster(
                args.workdir / "cluster-daemons", cores=cores, memory=args.executor_memory
            )
            if mode == "cluster"
            else contextlib.nullcontext("")
        ) as url:
            if url:
                env.update(
                    GRANK_SPARK__MASTER=url,
                    GRANK_SPARK__DRIVER_MEMORY="2g",
                    GRANK_SPARK__EXECUTOR_MEMORY=args.executor_memory,
                )
            else:
                env.update(
                    GRANK_SPARK__MASTER="local[*]", GRANK_SPARK__DRIVER_MEMORY=args.driver_memory
                )
            rebuild = grank(
                env, "features", "build", "--date", rebuild_day.isoformat(), "--rebuild"
            )
            daily = grank(env, "features", "build", "--date", last.isoformat())
        times[mode] = {"rebuild": rebuild, "daily": daily}
        digests[mode] = digest(root / "features")
        print(f"{mode}: rebuild {rebuild:.1f} s, daily increment {daily:.1f} s", flush=True)

    for step in ("rebuild", "daily"):
        ratio = times["cluster"][step] / times["local"][step]
        print(f"{step}: cluster / local = {ratio:.2f}x")
    identical = digests["local"] == digests["cluster"]
    print(f"feature tables byte-identical: {identical} ({len(digests['local'])} files)")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
