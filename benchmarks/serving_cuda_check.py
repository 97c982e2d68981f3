"""CUDA path check: bf16 matmul + top-k over 1M x 64 at batch 64, vs faiss exact results.

Run on a machine with a GPU (the reference is 0.64 ms on an H200; the target is within
1.5x of it). Times the serving code's own TorchMIPS kernel (matmul in the given dtype,
top-k in float32) with CUDA events after warm-up, and reports the top-100 overlap with
faiss IndexFlatIP float32 (bf16 rounding may reorder near-ties; float32 must match).

    .venv/bin/python benchmarks/serving_cuda_check.py [--items 1000000 --batch 64]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from serving.mips import TorchMIPS

# isort: split
import faiss  # after serving.mips, which loads torch first (see there)

REFERENCE_MS = 0.64


def device_ms(searcher: TorchMIPS, queries: torch.Tensor, k: int, repeats: int) -> float:
    """Median ms of matmul + top-k on device (queries already resident, as in a batch)."""
    matrix = searcher._matrix
    timings = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.topk((queries.to(matrix.dtype) @ matrix.T).float(), k, dim=1)
        end.record()
        torch.cuda.synchronize()
        timings.append(start.elapsed_time(end))
    return float(np.median(timings))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine")
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.batch, args.dim), dtype=np.float32)
    _, exact = faiss.knn(queries, matrix, args.k, metric=faiss.METRIC_INNER_PRODUCT)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "items": args.items,
        "dim": args.dim,
        "batch": args.batch,
        "k": args.k,
    }
    for dtype in ("bfloat16", "float32"):
        searcher = TorchMIPS(matrix, "cuda", dtype)
        on_device = torch.from_numpy(queries).cuda()
        for _ in range(20):
            device_ms(searcher, on_device, args.k, 1)
        ms = device_ms(searcher, on_device, args.k, args.repeats)
        _, rows = searcher.search(queries, args.k)
        overlap = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(rows, exact, strict=True)])
        report[dtype] = {"median_ms": round(ms, 4), f"overlap@{args.k}_vs_faiss": round(overlap, 4)}
    bf16_ms = report["bfloat16"]["median_ms"]  # type: ignore[index]
    report["bf16_vs_reference"] = round(bf16_ms / REFERENCE_MS, 2)
    report["within_1.5x_of_0.64ms"] = bf16_ms <= 1.5 * REFERENCE_MS
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
