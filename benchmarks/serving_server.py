"""The serving app in its own process for benchmarks, with synthetic in-memory user histories.

Histories are deterministic (seeded) random item sequences of the Contract-2 shape (long
200, short = its last 64) for users 1..N; the in-memory source removes the feature-store
round trip so the numbers isolate the serving path (Feast lookup latency is measured by
benchmarks/feast_lookups.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import uvicorn

from serving.app import ServeConfig, create_app
from serving.sequences import StaticUserSource, UserHistory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("snapshots", type=Path)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--users", type=int, default=6040)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--bf16-screen", choices=["auto", "on", "off"], default="auto")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = {}
    for user in range(1, args.users + 1):
        long = tuple(int(i) for i in rng.integers(1, args.items + 1, size=200))
        table[user] = UserHistory(short=long[-64:], long=long)
    config = ServeConfig(
        snapshots_dir=args.snapshots,
        device="cpu",
        bf16_screen=args.bf16_screen,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )
    app = create_app(config, StaticUserSource(table))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
