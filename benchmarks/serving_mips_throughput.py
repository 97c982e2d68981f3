"""Queries/s of the exact MIPS stage by batch size (what micro-batching buys), 1M x 64 float32.

Flat search is memory-bound: one pass over the matrix costs nearly the same for one
query as for many, so queries/s grows with the batch the micro-batcher assembles. Each
cell is the median of ``--reps`` timed calls after one untimed call of the same batch
(the machine is shared: read the median, not a single run). Also times the torch CPU
path on the same batches and checks it returns faiss' top-k.

    .venv/bin/python benchmarks/serving_mips_throughput.py --items 1000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from serving_common import cpu_note

from serving.mips import FaissFlatMIPS, TorchMIPS


def queries_per_s(
    search: FaissFlatMIPS | TorchMIPS, queries: np.ndarray, k: int, reps: int
) -> float:
    search.search(queries, k)  # warm-up on the same shapes
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        search.search(queries, k)
        seconds.append(time.perf_counter() - started)
    return len(queries) / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=400, help="k1 + seen-item headroom")
    parser.add_argument("--batches", default="1,8,32,64,256,1024,2048")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="time faiss only")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    faiss_path = FaissFlatMIPS(matrix)
    torch_path = TorchMIPS(matrix, "cpu")
    print(
        f"# exact MIPS stage, {args.items:,} x {args.dim} float32, k={args.k},"
        f" median of {args.reps} ({cpu_note()}, load {os.getloadavg()[0]:.1f})"
    )
    print("| batch | faiss flat kNN q/s | torch matmul+topk q/s |")
    print("|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        queries = rng.standard_normal((batch, args.dim), dtype=np.float32)
        f_qps = queries_per_s(faiss_path, queries, args.k, args.reps)
        t_qps = "-" if args.no_torch else f"{queries_per_s(torch_path, queries, args.k, 1):.0f}"
        print(f"| {batch} | {f_qps:.0f} | {t_qps} |", flush=True)
    queries = rng.standard_normal((64, args.dim), dtype=np.float32)
    _, f_rows = faiss_path.search(queries, 100)
    _, t_rows = torch_path.search(queries, 100)
    same = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(f_rows, t_rows, strict=True)])
    print(f"torch vs faiss top-100 overlap: {same:.4f} (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
