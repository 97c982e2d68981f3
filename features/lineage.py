"""Which raw content each built day consumed; which built days a late or corrected day made stale.

Every build of day D ends by writing ``features/_state/_lineage/dt=D.json``, the day's
commit record: the raw partitions that build read (day → fingerprint, the sha256 over
the partition's files, features/lake.py) and the built day whose state it continued
from. What a built day's tables depend on is then the union along that chain: every raw day up to D.

A raw day that landed after later days were built (late), or re-landed with other
content (corrected), differs from what those days consumed. :func:`first_stale_day`
finds the earliest such raw day; the job (features/jobs.py) then rebuilds every built
day from there, in order. A day without a lineage record is not built: a build that
failed half-way removed the old record first and never wrote the new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from common.atomic import atomic_write_text
from features import feature_tables as ft
from features.lake import landed_days, partition_fingerprint

LINEAGE_DIR = "_lineage"


@dataclass(frozen=True)
class Lineage:
    """The commit record of one built day."""

    day: date
    mode: str  # "rebuild" (read every raw day) or "incremental" (read D, continued ``previous``)
    previous: date | None
    raw: dict[date, str] = field(default_factory=dict)  # raw days read by this build


@dataclass(frozen=True)
class Staleness:
    """The earliest raw day whose content differs from what a built day consumed."""

    raw_day: date
    reason: str  # "late", "corrected" or "removed"
    built_day: date  # the earliest built day that consumed something else


def lineage_dir(features_dir: Path) -> Path:
    return features_dir / ft.STATE_DIR / LINEAGE_DIR


def lineage_path(features_dir: Path, day: date) -> Path:
    return lineage_dir(features_dir) / f"dt={day.isoformat()}.json"


def current_raw(lake_dir: Path, up_to: date) -> dict[date, str]:
    """Fingerprints of every landed raw day up to ``up_to``."""
    return {d: partition_fingerprint(lake_dir, d) for d in landed_days(lake_dir) if d <= up_to}


def write_lineage(features_dir: Path, lineage: Lineage) -> None:
    """Commit a built day (written last, after its tables and state)."""
    record = {
        "day": lineage.day.isoformat(),
        "mode": lineage.mode,
        "previous": lineage.previous.isoformat() if lineage.previous else None,
        "raw": {d.isoformat(): sha for d, sha in sorted(lineage.raw.items())},
    }
    atomic_write_text(
        lineage_path(features_dir, lineage.day), json.dumps(record, indent=1, sort_keys=True)
    )


def remove_lineage(features_dir: Path, day: date) -> None:
    """Un-commit ``day`` before its tables change: a failed build leaves it "not built"."""
    lineage_path(features_dir, day).unlink(missing_ok=True)


def read_lineage(features_dir: Path, day: date) -> Lineage | None:
    path = lineage_path(features_dir, day)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return Lineage(
        day=date.fromisoformat(record["day"]),
        mode=record["mode"],
        previous=date.fromisoformat(record["previous"]) if record["previous"] else None,
        raw={date.fromisoformat(d): sha for d, sha in record["raw"].items()},
    )


def built_days(features_dir: Path) -> list[date]:
    """Days with a committed build, oldest first."""
    folder = lineage_dir(features_dir)
    if not folder.exists():
        return []
    return sorted(
        date.fromisoformat(p.name[3:-5])
        for p in folder.iterdir()
        if p.name.startswith("dt=") and p.name.endswith(".json")
    )


def first_stale_day(
    features_dir: Path, current: dict[date, str], quarantined: set[date]
) -> Staleness | None:
    """The earliest raw day that a built day consumed differently from what is landed now.

    Walks the built days in order, each checked against its own record (what it read,
    and the landed days it should have read but did not) plus what its predecessor's
    check found: linear in the records, with no per-day copy of the history. A
    quarantined day is pending a fix, not a change: it stays as consumed until the fix
    is re-landed (then its new fingerprint shows up here). A day that continued from a
    day without a committed record is stale from that day on.
    """
    found: dict[date, Staleness | None] = {}
    earliest: Staleness | None = None
    landed = sorted(current)
    for day in built_days(features_dir):
        record = read_lineage(features_dir, day)
        if record is None:
            continue
        candidates: list[Staleness] = []
        if record.previous is not None:
            if record.previous not in found:
                candidates.append(Staleness(record.previous, "uncommitted", day))
            elif (inherited := found[record.previous]) is not None:
                candidates.append(inherited)
        start = record.previous
        for raw_day in landed:
            if raw_day > day:
                break
            unread = (start is None or raw_day > start) and raw_day not in record.raw
            if unread and raw_day not in quarantined:
                candidates.append(Staleness(raw_day, "late", day))
                break
        for raw_day, sha in record.raw.items():
            if raw_day in quarantined or current.get(raw_day) == sha:
                continue
            reason = "corrected" if raw_day in current else "removed"
            candidates.append(Staleness(raw_day, reason, day))
        stale = min(candidates, key=lambda s: s.raw_day) if candidates else None
        found[day] = stale
        if stale is not None and (earliest is None or stale.raw_day < earliest.raw_day):
            earliest = stale
    return earliest
