"""Queries/s of the exact MIPS stage by batch size (what micro-batching buys), 1M x 64 float32.

Flat search is memory-bound: one pass over the matrix costs nearly the same for one
query as for many, so queries/s grows with the batch the micro-batcher assembles. Also
times the torch CPU path on the same batches and checks it returns faiss' top-k.

    .venv/bin/python benchmarks/serving_mips_throughput.py --items 1000000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from serving_common import cpu_note

from serving.mips import FaissFlatMIPS, TorchMIPS


def queries_per_s(search: FaissFlatMIPS | TorchMIPS, queries: np.ndarray, k: int) -> float:
    search.search(queries[:1], k)  # warm-up
    started = time.perf_counter()
    search.search(queries, k)
    return len(queries) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=400, help="k1 + seen-item headroom")
    parser.add_argument("--batches", default="1,8,32,64,256,1024,2048")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    faiss_path = FaissFlatMIPS(matrix)
    torch_path = TorchMIPS(matrix, "cpu")
    print(f"# exact MIPS stage, {args.items:,} x {args.dim} float32, k={args.k} ({cpu_note()})")
    print("| batch | faiss IndexFlatIP q/s | torch matmul+topk q/s |")
    print("|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        queries = rng.standard_normal((batch, args.dim), dtype=np.float32)
        f_qps = queries_per_s(faiss_path, queries, args.k)
        t_qps = queries_per_s(torch_path, queries, args.k)
        print(f"| {batch} | {f_qps:.0f} | {t_qps:.0f} |")
    queries = rng.standard_normal((64, args.dim), dtype=np.float32)
    _, f_rows = faiss_path.search(queries, 100)
    _, t_rows = torch_path.search(queries, 100)
    same = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(f_rows, t_rows, strict=True)])
    print(f"torch vs faiss top-100 overlap: {same:.4f}")


if __name__ == "__main__":
    main()
