"""Shared pieces of the serving benchmarks: scale models, a server subprocess, memory probes.

Scale runs need item tables far beyond MovieLens (100k and 1M items), so they use an
untrained GRank of the serving shape (dim 64, short 64, long 200) whose item table is the
matrix under test; serving cost does not depend on whether the weights are trained.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import torch

from serving.bundle import refresh_embeddings
from serving.snapshots import publish_snapshot
from training.checkpoint import save_checkpoint
from training.model import GRank, GRankConfig

REPO = Path(__file__).resolve().parent.parent
DAY = date(2000, 12, 31)


def make_refresh(root: Path, n_items: int, seed: int, dim: int = 64) -> tuple[Path, float]:
    """Checkpoint + embedding refresh of a seeded scale model; returns (folder, refresh s)."""
    torch.manual_seed(seed)
    config = GRankConfig(n_item_rows=n_items + 1, dim=dim, n_layers=2, n_heads=2)
    checkpoint = root / "checkpoints" / f"scale-{n_items}-{seed}"
    save_checkpoint(GRank(config).eval(), checkpoint, {"metrics": {}})
    out = root / "embeddings" / f"scale-{n_items}-{seed}"
    ids = np.arange(1, n_items + 1)
    started = time.perf_counter()
    refresh_embeddings(checkpoint, out, ids, ids[::-1], progress=False)
    return out, time.perf_counter() - started


def publish(snapshots: Path, source: Path) -> str:
    return publish_snapshot(snapshots, source, DAY, {"feature_services": []}, keep=2)


@contextmanager
def server(
    snapshots: Path, n_items: int, port: int, **knobs: object
) -> Iterator[subprocess.Popen[bytes]]:
    """``benchmarks/serving_server.py`` in its own process on loopback, ready on exit."""
    args = [sys.executable, str(REPO / "benchmarks" / "serving_server.py"), str(snapshots)]
    args += ["--items", str(n_items), "--port", str(port)]
    for name, value in knobs.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    child = subprocess.Popen(args, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError("benchmark server did not become ready")
            time.sleep(0.1)
        yield child
    finally:
        child.terminate()
        child.wait(timeout=30)


def memory_mib(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process, MiB (from /proc)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def cpu_note() -> str:
    return f"{os.cpu_count()} cores, torch {torch.__version__}"
