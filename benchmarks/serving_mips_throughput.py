"""Queries/s of the exact MIPS stage by batch size (what micro-batching buys), 1M x 64 float32.

Side by side on the same matrix and queries, alternating per batch size so that all see
the same machine: the serving path with its exact bf16 screen (``TiledFlatMIPS`` with
``bf16_screen``: used where the catalogue is large enough), the float32 tiles alone
(MKL sgemm tiles + faiss heaps), ``faiss.knn`` (the search of
``IndexFlatIP``, with the faiss wheel's OpenBLAS), the float32 matrix product alone in
the same tiles (the ceiling of the float32 scan), and optionally torch matmul+topk.
Each cell is the median of ``--reps`` timed calls after one untimed call (the machine
is shared: read the median and the ratio, not a single run). Also checks that the
serving path returns faiss' top-k.

    .venv/bin/python benchmarks/serving_mips_throughput.py --items 1000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from serving_common import cpu_note

from serving.mips import TiledFlatMIPS, TorchMIPS

# isort: split
import faiss  # after serving.mips, which loads torch first (see there)


def queries_per_s(search: Callable[[], object], batch: int, reps: int) -> float:
    search()  # warm-up on the same shapes
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        search()
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def product_only(tiled: TiledFlatMIPS, queries: np.ndarray) -> None:
    """The float32 scan's matrix products without the top-k: that scan's ceiling."""
    for _ in tiled.score_tiles(torch.from_numpy(queries)):
        pass


def table_row(
    queries: np.ndarray,
    matrix: np.ndarray,
    screened: TiledFlatMIPS,
    tiled: TiledFlatMIPS,
    torch_path: TorchMIPS | None,
    args: argparse.Namespace,
) -> str:
    """One batch size: every path on the same queries, one after the other."""
    batch, k, reps = len(queries), args.k, args.reps
    served = queries_per_s(lambda: screened.search(queries, k), batch, reps)
    plain = queries_per_s(lambda: tiled.search(queries, k), batch, reps)
    reference = queries_per_s(
        lambda: faiss.knn(queries, matrix, k, metric=faiss.METRIC_INNER_PRODUCT), batch, reps
    )
    ceiling = queries_per_s(lambda: product_only(tiled, queries), batch, reps)
    topk = "-"
    if torch_path is not None:
        topk = f"{queries_per_s(lambda: torch_path.search(queries, k), batch, 1):.0f}"
    return (
        f"| {batch} | {served:.0f} | {plain:.0f} | {served / plain:.2f}x | {reference:.0f}"
        f" | {ceiling:.0f} | {topk} |"
    )


def norm_spread_table(matrix: np.ndarray, args: argparse.Namespace) -> None:
    """The screen's proof against item norms of growing spread (trained tables are not
    isotropic): the same directions, rescaled; 64 queries per search."""
    rng = np.random.default_rng(1)
    directions = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = rng.standard_normal((64, args.dim), dtype=np.float32)
    print("\n| norm sigma | max / median norm | rescanned queries | screen q/s | float32 q/s |")
    print("|---:|---:|---:|---:|---:|")
    for sigma in (float(v) for v in args.norm_sigmas.split(",")):
        norms = np.exp(sigma * rng.standard_normal((len(matrix), 1))).astype(np.float32)
        scaled = directions * norms
        screened, tiled = TiledFlatMIPS(scaled, bf16_screen=True), TiledFlatMIPS(scaled)
        screened.search(queries, args.k)
        rescans = screened.screen_rescans
        served = queries_per_s(partial(screened.search, queries, args.k), 64, args.reps)
        plain = queries_per_s(partial(tiled.search, queries, args.k), 64, args.reps)
        spread = float(norms.max() / np.median(norms))
        print(f"| {sigma} | {spread:,.0f} | {rescans} / 64 | {served:.0f} | {plain:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=400, help="k1 + seen-item headroom")
    parser.add_argument("--batches", default="1,8,32,64,256,1024,2048")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--torch-topk", action="store_true", help="also time matmul+topk")
    parser.add_argument(
        "--norm-sigmas",
        default="",
        help="also: item norms spread as exp(sigma * N(0,1)); how often the screen falls back",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    tiled = TiledFlatMIPS(matrix)
    started = time.perf_counter()
    screened = TiledFlatMIPS(matrix, bf16_screen=True)
    screen_setup_s = time.perf_counter() - started
    torch_path = TorchMIPS(matrix, "cpu") if args.torch_topk else None
    print(
        f"# exact MIPS stage, {args.items:,} x {args.dim} float32, k={args.k},"
        f" median of {args.reps} ({cpu_note()}, load {os.getloadavg()[0]:.1f});"
        f" bf16 copy + norms built in {screen_setup_s:.2f} s"
    )
    print(
        "| batch | serving (bf16 screen) q/s | float32 tiles + faiss heaps q/s | ratio"
        " | faiss.knn (IndexFlatIP) q/s | float32 products alone q/s | torch matmul+topk q/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        queries = rng.standard_normal((batch, args.dim), dtype=np.float32)
        print(table_row(queries, matrix, screened, tiled, torch_path, args), flush=True)
    if args.norm_sigmas:
        norm_spread_table(matrix, args)
    queries = rng.standard_normal((64, args.dim), dtype=np.float32)
    served_scores, served_rows = screened.search(queries, args.k)
    faiss_scores, faiss_rows = faiss.knn(queries, matrix, args.k, metric=faiss.METRIC_INNER_PRODUCT)
    same_sets = np.array_equal(np.sort(served_rows, 1), np.sort(faiss_rows, 1))
    # MKL and OpenBLAS sum in different orders: near-equal scores may swap places
    print(
        f"serving path vs faiss.knn, 64 queries, top-{args.k}: same ids {same_sets},"
        f" same order {np.array_equal(served_rows, faiss_rows)}, max score difference"
        f" {np.abs(served_scores - faiss_scores).max():.1e} (load {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
