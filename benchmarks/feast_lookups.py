"""Feast benchmark: materialization time and online lookup latency (sqlite vs Redis, SDK vs HTTP).

Writes contract-shaped feature tables (docs/architecture.md, Contract 2) for ``--users``
users with ``--seq-len`` long sequences into a temporary data root, registers them,
times ``materialize_window`` for one day, then times lookups of the ``grank_ranker_v1``
service (item_seq + ts_seq) for ``--sizes`` users per request (default 1 and 100), through
the Python SDK and through the read-only HTTP server (``grank features serve`` in a
subprocess, its entity limit raised to the largest size).

    .venv/bin/python benchmarks/feast_lookups.py --users 6040 --seq-len 200
    .venv/bin/python benchmarks/feast_lookups.py --users 1000000 --seq-len 20 --lookups 0
    .venv/bin/python benchmarks/feast_lookups.py --users 10000 --sizes 1000,10000 --lookups 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import StoreConfig
from features.feature_store import materialize_window, open_store, register
from features.lake import US_PER_DAY, day_start_us

DAY = date(2003, 2, 28)
N_ITEMS = 3883
TS = pa.timestamp("us", tz="UTC")


def _lists(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def write_tables(features_dir: Path, users: int, seq_len: int, seed: int = 0) -> None:
    """One day of the three online tables, sized like ML-1M (or bigger), by seed."""
    rng = np.random.default_rng(seed)
    start = day_start_us(DAY)
    end_of_day = start + US_PER_DAY - 1
    user_ids = np.arange(1, users + 1, dtype=np.int64)
    lengths = rng.integers(1, seq_len + 1, size=users)
    total = int(lengths.sum())
    items = rng.integers(1, N_ITEMS + 1, size=total, dtype=np.int64)
    stamps = np.sort(rng.integers(start - 365 * US_PER_DAY, start, size=total))
    last = np.full(users, start + 1_000_000, dtype=np.int64)
    short_lengths = np.minimum(lengths, 64)
    ends = np.cumsum(lengths)
    short_idx = np.concatenate(
        [np.arange(e - s, e) for e, s in zip(ends, short_lengths, strict=True)]
    )

    def ts(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.int64()).cast(TS)

    n = users
    tables = {
        "user_behavior_sequences": pa.table(
            {
                "user_id": user_ids,
                "item_seq": _lists(items, lengths),
                "ts_seq": _lists(stamps, lengths),
                "event_type_seq": _lists(np.full(total, "rating", dtype=object), lengths),
                "value_seq": _lists(np.full(total, 4.0, dtype=np.float32), lengths),
                "short_item_seq": _lists(items[short_idx], short_lengths),
                "seq_len": lengths.astype(np.int64),
                "last_event_ts": ts(last),
                "event_timestamp": ts(last),
                "created": ts(np.full(n, end_of_day)),
            }
        ),
        "user_features": pa.table(
            {
                "user_id": user_ids,
                **{f"events_{w}": lengths.astype(np.int64) for w in ("1d", "7d", "30d", "total")},
                "mean_value": np.full(n, 3.5, dtype=np.float32),
                "first_seen_ts": ts(np.full(n, start - 365 * US_PER_DAY)),
                "tenure_days": np.full(n, 365, dtype=np.int64),
                "age": pa.array(np.full(n, 25, dtype=np.int32)),
                "gender": pa.array(np.where(user_ids % 2 == 0, "F", "M")),
                "occupation": pa.array((user_ids % 21).astype(str)),
                "event_timestamp": ts(np.full(n, end_of_day)),
                "created": ts(np.full(n, end_of_day)),
            }
        ),
        "item_features": pa.table(
            {
                "item_id": np.arange(1, N_ITEMS + 1, dtype=np.int64),
                **{
                    f"pop_{w}": np.ones(N_ITEMS, dtype=np.int64)
                    for w in ("1d", "7d", "30d", "total")
                },
                "first_seen_ts": ts(np.full(N_ITEMS, start)),
                "title": pa.array([f"item {i}" for i in range(1, N_ITEMS + 1)]),
                "year": pa.array(np.full(N_ITEMS, 1999, dtype=np.int32)),
                "genres": pa.array(["Drama"] * N_ITEMS),
                "event_timestamp": ts(np.full(N_ITEMS, end_of_day)),
                "created": ts(np.full(N_ITEMS, end_of_day)),
            }
        ),
    }
    for name, table in tables.items():
        folder = features_dir / name / f"dt={DAY.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "part-00000.parquet")


def percentiles(run: Callable[[], object], repeats: int) -> str:
    """p50/p99 in milliseconds of ``repeats`` calls (after 5 warm-up calls)."""
    for _ in range(5):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {cuts[49]:7.2f} ms  p99 {cuts[98]:7.2f} ms"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_store(
    root: Path,
    backend: str,
    users: int,
    lookups: int,
    sizes: list[int],
    rng: np.random.Generator,
) -> None:
    project = f"bench_{uuid.uuid4().hex[:8]}"
    config = StoreConfig(repo_dir=root / "feast", project=project, online_store=backend)  # type: ignore[arg-type]
    store = open_store(config)
    try:
        register(store, root / "features")
        started = time.perf_counter()
        written = materialize_window(store, root / "features", DAY, DAY, batch_rows=1000)
        seconds = time.perf_counter() - started
        print(
            f"{backend:6s} materialize {written['user_behavior_sequences']:,} users"
            f" (+{written['user_features']:,} user_features, {written['item_features']:,} items):"
            f" {seconds:.1f} s, {written['user_behavior_sequences'] / seconds:,.0f} users/s",
            flush=True,
        )
        if lookups == 0:
            return
        service = store.get_feature_service("grank_ranker_v1")

        def pick(k: int) -> list[int]:
            return [int(u) for u in rng.integers(1, users + 1, size=k)]

        for k in sizes:
            result = percentiles(
                lambda k=k: store.get_online_features(  # type: ignore[misc]
                    features=service, entity_rows=[{"user_id": u} for u in pick(k)]
                ).to_dict(),
                lookups,
            )
            print(f"{backend:6s} SDK  {k:6,d} users/request: {result}", flush=True)
        port = _free_port()
        env = {
            **os.environ,
            "GRANK_DATA_ROOT": str(root),
            "GRANK_FEAST__ONLINE_STORE": backend,
            "GRANK_FEAST__PROJECT": project,
            "GRANK_FEAST__SERVER_MAX_ENTITIES": str(max(sizes)),
            "GRANK_FEAST__SERVER_MAX_BODY_BYTES": str(max(1 << 20, 24 * max(sizes))),
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "grank", "features", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(timeout=30) as client:
                deadline = time.monotonic() + 90
                while True:
                    try:
                        if client.get(f"{url}/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.3)
                    if time.monotonic() > deadline:
                        raise RuntimeError("lookup server did not start")
                for k in sizes:

                    def lookup(k: int = k) -> None:
                        body = {
                            "feature_service": "grank_ranker_v1",
                            "entities": {"user_id": pick(k)},
                        }
                        client.post(f"{url}/get-online-features", json=body).raise_for_status()

                    print(
                        f"{backend:6s} HTTP {k:6,d} users/request: {percentiles(lookup, lookups)}",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        if backend == "redis":
            store.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6040)
    parser.add_argument("--seq-len", type=int, default=200, help="max sequence length")
    parser.add_argument("--lookups", type=int, default=300, help="timed requests per case")
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--sizes", default="1,100", help="users per request, comma-separated")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="feast-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_tables(root / "features", args.users, args.seq_len)
        print(
            f"tables: {args.users:,} users, sequences up to {args.seq_len}"
            f" ({time.perf_counter() - started:.1f} s to write)",
            flush=True,
        )
        for backend in args.stores.split(","):
            bench_store(root, backend, args.users, args.lookups, sizes, rng)


if __name__ == "__main__":
    main()
