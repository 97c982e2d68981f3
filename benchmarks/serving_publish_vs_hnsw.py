"""Publish-to-serving time of the index-free design vs building a faiss HNSW index.

For each size: a server runs on snapshot v1; v2 (another model) is refreshed; then the
clock starts, v2 is published (link, hash, manifest, CURRENT) and the first /recommend
answered from v2 stops it (/version is polled every 10 ms until the swap, then one
/recommend is timed). On the same v2 vectors, faiss HNSW (M=32, efConstruction=200,
inner product) is built, and its recall@100 vs exact flat search is measured at several
efSearch values. HNSW appears only here, as the comparison; serving never builds one.

    .venv/bin/python benchmarks/serving_publish_vs_hnsw.py --items 100000 --items 1000000
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import faiss
import httpx
import numpy as np
import torch
from serving_common import cpu_note, make_refresh, memory_mib, publish, server

from serving.bundle import EMBEDDINGS_FILE
from training.checkpoint import load_checkpoint


def publish_to_serving(root: Path, n_items: int, port: int) -> dict[str, float]:
    snapshots = root / "snapshots"
    first, _ = make_refresh(root, n_items, seed=1)
    publish(snapshots, first)
    second, refresh_s = make_refresh(root, n_items, seed=2)
    with server(snapshots, n_items, port) as child, httpx.Client(timeout=30) as http:
        before = memory_mib(child.pid)
        started = time.perf_counter()
        version = publish(snapshots, second)
        published = time.perf_counter()
        # poll the cheap /version so the probe does not steal CPU from the load it waits for
        while http.get(f"http://127.0.0.1:{port}/version").json()["version"] != version:
            time.sleep(0.01)
        swapped = time.perf_counter()
        body = http.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": 7}).json()
        served = time.perf_counter()
        assert body["snapshot_version"] == version
        metrics = http.get(f"http://127.0.0.1:{port}/metrics").text
        load_s = float(re.search(r"^grank_snapshot_load_seconds (\S+)$", metrics, re.M).group(1))
        after = memory_mib(child.pid)
    return {
        "refresh_s": refresh_s,
        "publish_s": published - started,
        "publish_to_swap_seen_s": swapped - started,
        "first_answer_s": served - swapped,
        "publish_to_serving_s": served - started,
        "server_load_s": load_s,
        "rss_before_mib": before["VmRSS"],
        "peak_rss_mib": after["VmHWM"],
        "rss_after_mib": after["VmRSS"],
    }


def hnsw_comparison(
    root: Path, n_items: int, queries: int, ef_values: list[int]
) -> tuple[float, list[tuple[int, float, float]], float]:
    """(HNSW build s, [(efSearch, recall@100, q/s)], flat q/s) on the published v2 vectors."""
    matrix = np.load(root / "embeddings" / f"scale-{n_items}-2" / EMBEDDINGS_FILE)
    model, _ = load_checkpoint(next((root / "checkpoints").glob(f"scale-{n_items}-2")))
    rng = np.random.default_rng(1)
    short = torch.from_numpy(rng.integers(1, n_items + 1, size=(queries, 64)))
    with torch.inference_mode():
        q = model.user_vectors(short).float().numpy()
    flat = faiss.IndexFlatIP(matrix.shape[1])
    flat.add(matrix)
    started = time.perf_counter()
    _, exact = flat.search(q, 100)
    flat_qps = queries / (time.perf_counter() - started)
    hnsw = faiss.IndexHNSWFlat(matrix.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 200
    started = time.perf_counter()
    hnsw.add(matrix)
    build_s = time.perf_counter() - started
    rows = []
    for ef in ef_values:
        hnsw.hnsw.efSearch = ef
        started = time.perf_counter()
        _, found = hnsw.search(q, 100)
        qps = queries / (time.perf_counter() - started)
        recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(found, exact, strict=True)])
        rows.append((ef, float(recall), qps))
    return build_s, rows, flat_qps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, action="append", required=True)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ef", default="16,32,64,128,256,512")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--hnsw-max-items", type=int, default=10**9, help="skip the HNSW build above this size"
    )
    args = parser.parse_args()
    ef_values = [int(v) for v in args.ef.split(",")]
    print(
        f"# publish-to-serving vs HNSW build ({cpu_note()},"
        f" faiss threads {faiss.omp_get_max_threads()})"
    )
    for n_items in args.items:
        with tempfile.TemporaryDirectory(
            dir=Path(__file__).resolve().parent.parent / "data"
        ) as tmp:
            root = Path(tmp)
            swap = publish_to_serving(root, n_items, args.port)
            print(f"\n## {n_items:,} items x 64")
            for key, value in swap.items():
                print(f"{key}: {value:.3f}")
            if n_items > args.hnsw_max_items:
                print("hnsw: skipped (--hnsw-max-items)")
                continue
            build_s, rows, flat_qps = hnsw_comparison(root, n_items, args.queries, ef_values)
            print(f"hnsw_build_s (M=32, efConstruction=200): {build_s:.1f}")
            print(f"build / publish-to-serving: {build_s / swap['publish_to_serving_s']:.0f}x")
            print(f"flat exact: recall@100 1.000, {flat_qps:.0f} q/s (batch {args.queries})")
            print("| efSearch | HNSW recall@100 | HNSW q/s |")
            print("|---:|---:|---:|")
            for ef, recall, qps in rows:
                print(f"| {ef} | {recall:.3f} | {qps:.0f} |")


if __name__ == "__main__":
    main()
