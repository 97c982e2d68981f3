"""The publish gate: a candidate must beat the best baseline and not lose to the published model.

One day's next-day evaluation is noisy (ML-1M has 40-60 queries a day in December 2000),
so the gate pools the per-query results of a trailing window of days (each day's candidate
against that day's baselines and published model, on that day's queries) and decides on
paired bootstrap confidence intervals over users:

- the candidate must beat the best baseline (the one with the highest pooled mean): the
  lower bound of the interval of (candidate - baseline) must be above 0;
- it must not be worse than the published model: the interval of (candidate - published)
  must not lie entirely below 0 (skipped while nothing is published);
- the window must hold at least ``min_queries`` queries, or there is no verdict to trust.

Resampling is by user (a user with queries on several days is one unit), so a heavy user's
days cannot make an interval look tighter than the evidence is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_write_bytes
from training.metrics import user_bootstrap_interval

CANDIDATE = "candidate"
PUBLISHED = "published"
EVIDENCE_FILE = "queries.parquet"


@dataclass(frozen=True)
class GatePolicy:
    """The gate's knobs (``GRANK_TRAIN__GATE__<FIELD>``; docs/model.md explains them).

    ``baseline_margin``: how far above 0 the interval's lower end of (candidate - best
    baseline) must lie; a negative margin lets a candidate that far below the baseline
    through (for a deployment that wants the model whatever popularity does).
    """

    metric: str = "ndcg@10"
    # two weeks: on ML-1M's ~50 next-day queries a day, a week (~420 queries) leaves the
    # interval about +-0.019 N@10 wide, as wide as a candidate's lead over popularity
    # (docs/benchmarks.md, "The gate's window")
    window_days: int = 14
    min_queries: int = 100
    confidence: float = 0.95
    baseline_margin: float = 0.0
    resamples: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval of a mean paired difference."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


@dataclass(frozen=True)
class Verdict:
    """What the gate decided, and the numbers it decided on."""

    publishable: bool
    reason: str
    n_queries: int
    n_users: int
    best_baseline: str | None
    vs_baseline: Interval | None
    vs_published: Interval | None
    means: dict[str, float]


def write_evidence(folder: Path, records: pa.Table) -> None:
    """Store one evaluation's per-query records (day, user_id, <model>.<metric> columns)."""
    sink = pa.BufferOutputStream()
    pq.write_table(records, sink)
    atomic_write_bytes(folder / EVIDENCE_FILE, sink.getvalue().to_pybytes())


def read_evidence(folders: list[Path], first_day: int, last_day: int) -> pa.Table | None:
    """The records of days ``first_day..last_day`` (day numbers) from these evaluations."""
    tables = [pq.read_table(f / EVIDENCE_FILE) for f in folders if (f / EVIDENCE_FILE).is_file()]
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    days = table["day"].to_numpy()
    return table.filter(pa.array((days >= first_day) & (days <= last_day)))


def paired_interval(diffs: np.ndarray, users: np.ndarray, policy: GatePolicy) -> Interval:
    """Bootstrap interval of ``mean(diffs)``, resampling whole users with replacement."""
    low, high = user_bootstrap_interval(
        diffs, users, resamples=policy.resamples, confidence=policy.confidence, seed=policy.seed
    )
    return Interval(float(diffs.mean()), low, high)


def decide(records: pa.Table | None, baselines: list[str], policy: GatePolicy) -> Verdict:
    """The verdict on the pooled ``records`` (``<model>.<metric>`` columns, NaN = absent)."""
    metric = policy.metric
    n = 0 if records is None else records.num_rows
    if records is None or n < policy.min_queries:
        return Verdict(
            False,
            f"not enough evidence: {n} queries in the last {policy.window_days} days,"
            f" the gate needs {policy.min_queries}",
            n,
            0,
            None,
            None,
            None,
            {},
        )
    users = records["user_id"].to_numpy()

    def column(model: str) -> np.ndarray:
        return records[f"{model}.{metric}"].to_numpy(zero_copy_only=False).astype(np.float64)

    candidate = column(CANDIDATE)
    means = {CANDIDATE: float(candidate.mean())}
    for name in baselines:
        means[name] = float(column(name).mean())
    best = max(baselines, key=lambda name: means[name])
    vs_baseline = paired_interval(candidate - column(best), users, policy)
    vs_published = None
    if f"{PUBLISHED}.{metric}" in records.column_names:
        published = column(PUBLISHED)
        present = ~np.isnan(published)
        if present.any():
            means[PUBLISHED] = float(published[present].mean())
            vs_published = paired_interval(
                candidate[present] - published[present], users[present], policy
            )
    level = f"{policy.confidence:.0%}"
    problems = []
    if vs_baseline.low <= policy.baseline_margin:
        problems.append(
            f"not better than the best baseline {best} on {metric}: difference {vs_baseline}"
            f" ({level} interval must be above {policy.baseline_margin:g})"
        )
    if vs_published is not None and vs_published.high < 0:
        problems.append(f"worse than the published model on {metric}: difference {vs_published}")
    summary = (
        f"{n} queries of {len(np.unique(users))} users over {policy.window_days} days;"
        f" vs {best} {vs_baseline}"
        + ("" if vs_published is None else f"; vs published {vs_published}")
    )
    return Verdict(
        not problems,
        "; ".join(problems) + f" ({summary})" if problems else summary,
        n,
        len(np.unique(users)),
        best,
        vs_baseline,
        vs_published,
        means,
    )
