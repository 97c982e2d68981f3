"""Training throughput (examples/s) with one and with several data-parallel processes.

Usage (results go to docs/benchmarks.md, "Training throughput: one and two processes")::

    .venv/bin/python benchmarks/training_throughput.py --data-root data \
        --date 2000-12-08 --days 60 --seconds 120 --processes 1,1x1,2

For each process count, in turn: ``torchrun --standalone`` starts that many workers of
this script; each reads the same features (``--days`` days before ``--date`` of the
data root's ``features/training_examples``, with the model's point-in-time features),
builds GRank with the configured (``GRANK_TRAIN__*``) sizes and the configured global
batch, and trains for ``--seconds`` of wall-clock time through the same code path as
``grank train`` (``training.train.train_epoch`` under DistributedDataParallel). Only the
training steps are timed, not reading the data or cutting the windows. Rank 0 reports
global examples (steps x global batch) per second; the table shows the counts side by
side with their ratio to the first run. Each run gets ``cores / processes`` intra-op
threads, as ``grank train --processes`` gives its workers; ``NxT`` in ``--processes``
runs N processes with T threads each (``1x1``: one process, one thread: on a machine
whose cores other jobs keep busy, two OpenMP threads spin waiting for each other and
the default one-process run measures that, not training).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np

RESULT_PREFIX = "RESULT "


def _worker(args: argparse.Namespace) -> None:
    """One torchrun worker: train for ``args.seconds`` and (rank 0) print the rate."""
    import torch

    from grank.cli.train import daily_job
    from grank.config import Settings
    from training.daily import read_day_data
    from training.data import item_counts, make_windows, next_day
    from training.distributed import (
        SINGLE,
        device_for,
        join_from_env,
        launched_by_torchrun,
        leave,
        wrap,
    )
    from training.losses import grank_batch_loss, log_q
    from training.model import GRank
    from training.train import StepLoss, seed_everything, train_epoch

    parallel = join_from_env() if launched_by_torchrun() else SINGLE
    device = device_for(parallel)
    settings = Settings(data_root=Path(args.data_root))
    day = date.fromisoformat(args.date)
    job = daily_job(settings, day, from_scratch=True, parallel=parallel)
    probe_rows = int(job.catalogue.max(initial=0)) + 1
    first = day - timedelta(days=args.days)
    data = read_day_data(job, first, job.model.inputs, probe_rows, device)
    n_rows = max(probe_rows, data.timelines.max_item_id + 1)
    if n_rows != probe_rows:
        data = read_day_data(job, first, job.model.inputs, n_rows, device)
    train_end, _, _ = next_day(data.timelines, day)
    seed_everything(job.fit.seed)
    model = GRank(replace(job.model, n_item_rows=n_rows)).to(device)
    loss = grank_batch_loss(
        job.weights, log_q(item_counts(data.timelines, train_end, n_rows), device)
    )
    config = replace(job.fit, progress=False, max_seconds=args.seconds)
    step_loss = wrap(StepLoss(model, loss), parallel)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    rng = np.random.default_rng(config.seed)
    steps, trained = 0, 0.0
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        windows = make_windows(
            data.timelines,
            train_end,
            job.spec.short_len,
            job.spec.long_len,
            config.stride,
            rng,
            data.model_inputs.codes,
        )
        started = time.perf_counter()
        _, epoch_steps, _ = train_epoch(
            step_loss,
            optimizer,
            data.timelines,
            windows,
            data.model_inputs,
            config,
            rng,
            deadline,
            "throughput",
            parallel,
        )
        trained += time.perf_counter() - started
        steps += epoch_steps
    if parallel.is_main:
        record = {
            "processes": parallel.world_size,
            "threads": torch.get_num_threads(),
            "events": int(item_counts(data.timelines, train_end, n_rows).sum()),
            "global_batch": config.batch_size,
            "steps": steps,
            "seconds": round(trained, 1),
            "examples_per_s": round(steps * config.batch_size / trained, 1),
            "bf16": config.bf16,
        }
        print(RESULT_PREFIX + json.dumps(record), flush=True)
    leave(parallel)


def _run(args: argparse.Namespace, spec: str) -> dict[str, object]:
    """Start the workers ``spec`` (``N`` or ``NxT``) asks for; returns rank 0's record."""
    from training.distributed import default_threads, torchrun_command

    processes_text, _, threads_text = spec.partition("x")
    processes = int(processes_text)
    threads = int(threads_text) if threads_text else default_threads(processes)

    command = torchrun_command(
        processes,
        *(__file__, "--worker", "--data-root", args.data_root, "--date", args.date),
        *("--days", str(args.days), "--seconds", str(args.seconds)),
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{processes} process(es) failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="data", help="data root with features/ and lake/")
    parser.add_argument("--date", default="2000-12-08", help="test day: trains on days before")
    parser.add_argument("--days", type=int, default=60, help="training days before --date")
    parser.add_argument("--seconds", type=float, default=120.0, help="training time per run")
    parser.add_argument(
        "--processes", default="1,2", help="runs, in turn: N processes, or NxT with T threads"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    rows = [_run(args, spec) for spec in args.processes.split(",")]
    base = float(rows[0]["examples_per_s"])  # type: ignore[arg-type]
    print(f"{rows[0]['events']:,} training events, global batch {rows[0]['global_batch']}")
    print(f"{'processes':>9} {'threads':>7} {'steps':>6} {'seconds':>7} {'examples/s':>10} ratio")
    for row in rows:
        rate = float(row["examples_per_s"])  # type: ignore[arg-type]
        print(
            f"{row['processes']:>9} {row['threads']:>7} {row['steps']:>6} {row['seconds']:>7}"
            f" {rate:>10.1f} {rate / base:.2f}x"
        )


if __name__ == "__main__":
    main()
