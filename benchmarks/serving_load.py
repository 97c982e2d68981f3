"""End-to-end /recommend latency and throughput under wrk, plus per-stage timings.

A server process (benchmarks/serving_server.py) serves one snapshot of N items x 64; wrk
(`apt-get install -y wrk`) drives POST /recommend on loopback with random users at 1, 8
and 32 connections. p50/p99 and requests/s come from wrk; per-stage means (lookup,
generator, MIPS, ranker) and the mean batch size from the server's /metrics deltas.
Each ``--bf16-screen`` mode gets its own server on the same snapshot, one after the other.

    .venv/bin/python benchmarks/serving_load.py --items 100000 --items 1000000
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
from serving_common import cpu_note, make_refresh, memory_mib, publish, server

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
math.randomseed(42)
request = function()
  return wrk.format(nil, "/recommend", nil, '{"user_id": ' .. math.random(1, 6040) .. ', "k": 10}')
end
"""
SERIES = re.compile(
    r"^(grank_stage_latency_seconds|grank_batch_size)_(sum|count)(\{[^}]*\})? (\S+)$"
)


def scrape(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        match = SERIES.match(line)
        if match:
            values[f"{match.group(1)}_{match.group(2)}{match.group(3) or ''}"] = float(
                match.group(4)
            )
    return values


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per request of each stage, and the mean batch size, over one run."""
    means = {}
    for stage in ("lookup", "generator", "mips", "ranker", "total"):
        key = f'{{stage="{stage}"}}'
        count = after[f"grank_stage_latency_seconds_count{key}"] - before.get(
            f"grank_stage_latency_seconds_count{key}", 0
        )
        total = after[f"grank_stage_latency_seconds_sum{key}"] - before.get(
            f"grank_stage_latency_seconds_sum{key}", 0
        )
        means[f"{stage}_ms"] = 1e3 * total / max(count, 1)
    batches = after["grank_batch_size_count"] - before.get("grank_batch_size_count", 0)
    requests = after["grank_batch_size_sum"] - before.get("grank_batch_size_sum", 0)
    means["mean_batch"] = requests / max(batches, 1)
    return means


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        [
            *("wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s"),
            *("--latency", "-s", str(script), url),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if match is None:
            raise RuntimeError(f"no {label} in wrk output:\n{out}")
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]
        return float(match.group(1)) * scale

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "rps": float(rps.group(1)) if rps else 0.0,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        "socket_errors": float(sum(int(g) for g in socket.groups())) if socket else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, action="append", required=True)
    parser.add_argument("--connections", default="1,8,32")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--bf16-screen", default="on,off", help="MIPS screen modes to compare")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    print(f"# /recommend under wrk ({cpu_note()}, {args.seconds}s per run, k=10, k1=200)")
    for n_items in args.items:
        with tempfile.TemporaryDirectory(
            dir=Path(__file__).resolve().parent.parent / "data"
        ) as tmp:
            root = Path(tmp)
            script = root / "recommend.lua"
            script.write_text(WRK_SCRIPT)
            source, _ = make_refresh(root, n_items, seed=1)
            publish(root / "snapshots", source)
            url = f"http://127.0.0.1:{args.port}"
            for screen in args.bf16_screen.split(","):
                knobs = {"max_batch": args.max_batch, "bf16_screen": screen}
                with server(root / "snapshots", n_items, args.port, **knobs) as child:
                    print(f"\n## {n_items:,} items x 64, bf16 screen {screen}")
                    load_levels(url, script, args)
                    memory = memory_mib(child.pid)
                    print(
                        f"server memory: rss {memory['VmRSS']:.0f} MiB,"
                        f" peak {memory['VmHWM']:.0f} MiB"
                    )


def load_levels(url: str, script: Path, args: argparse.Namespace) -> None:
    """One warm-up, then one wrk run per connection count, as a markdown table."""
    run_wrk(url, script, 8, 3)
    print(
        "| clients | p50 ms | p99 ms | req/s | errors | mean batch "
        "| lookup ms | generator ms | MIPS ms | ranker ms | server total ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for connections in (int(c) for c in args.connections.split(",")):
        before = scrape(url)
        result = run_wrk(url, script, connections, args.seconds)
        stages = stage_means(before, scrape(url))
        errors = result["non_2xx"] + result["socket_errors"]
        print(
            f"| {connections} | {result['p50_ms']:.1f} | {result['p99_ms']:.1f}"
            f" | {result['rps']:.0f} | {errors:.0f}"
            f" | {stages['mean_batch']:.1f} | {stages['lookup_ms']:.2f}"
            f" | {stages['generator_ms']:.1f} | {stages['mips_ms']:.1f}"
            f" | {stages['ranker_ms']:.1f} | {stages['total_ms']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
