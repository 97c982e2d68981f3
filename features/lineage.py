"""Which raw content each built day consumed; which built days a late or corrected day made stale.

Every build of day D ends by writing ``features/_state/_lineage/dt=D.json``, the day's
commit record: the raw partitions that build read (day → fingerprint, the sha256 over
the partition's files, features/lake.py) and the built day whose state it continued
from. What a built day's tables depend on is then the union along that chain: every raw day up to D.

A raw day that landed after later days were built (late), or re-landed with other
content (corrected), differs from what those days consumed. :func:`first_stale_day`
finds the earliest such raw day; the job (features/jobs.py) then rebuilds every built
day from there, in order. A day without a lineage record is not built.

A day's tables and state are committed together. The build writes every partition it
produces (the day's tables, its state, and a rebuild's earlier days) into a staging
folder, ``features/_state/_pending/dt=D/``, laid out like ``features/``; nothing
committed changes while Spark runs, so a build that fails leaves the previous complete
version of every day as it was. Then :func:`commit_day` writes the commit manifest
``_pending/dt=D.json`` (the lineage record and the staged partitions): that write is
the commit point. Applying it swaps each staged partition in atomically (its lineage
record is removed first and written last, so in between the day counts as not built),
then deletes the staging folder and the manifest. A process killed while applying is
finished by :func:`recover_commits` on the next build (roll forward: the manifest names
everything, and applying it again is harmless); a staging folder without a manifest is
a build that never reached its commit point and is deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from common.atomic import atomic_write_text, crash_point, fsync_dir, staging_dir
from features import feature_tables as ft
from features.lake import landed_days, partition_fingerprint, partition_path

LINEAGE_DIR = "_lineage"
PENDING_DIR = "_pending"


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
    return ft.FeatureTables(features_dir).state_root / LINEAGE_DIR


def lineage_path(features_dir: Path, day: date) -> Path:
    return lineage_dir(features_dir) / f"dt={day.isoformat()}.json"


def current_raw(lake_dir: Path, up_to: date) -> dict[date, str]:
    """Fingerprints of every landed raw day up to ``up_to``."""
    return {d: partition_fingerprint(lake_dir, d) for d in landed_days(lake_dir) if d <= up_to}


def _as_record(lineage: Lineage) -> dict[str, object]:
    return {
        "day": lineage.day.isoformat(),
        "mode": lineage.mode,
        "previous": lineage.previous.isoformat() if lineage.previous else None,
        "raw": {d.isoformat(): sha for d, sha in sorted(lineage.raw.items())},
    }


def _from_record(record: dict[str, object]) -> Lineage:
    previous = record["previous"]
    raw = record["raw"]
    assert isinstance(raw, dict)
    return Lineage(
        day=date.fromisoformat(str(record["day"])),
        mode=str(record["mode"]),
        previous=date.fromisoformat(str(previous)) if previous else None,
        raw={date.fromisoformat(d): sha for d, sha in raw.items()},
    )


def write_lineage(features_dir: Path, lineage: Lineage) -> None:
    """Mark a built day committed (written last, after its tables and state)."""
    atomic_write_text(
        lineage_path(features_dir, lineage.day),
        json.dumps(_as_record(lineage), indent=1, sort_keys=True),
    )


def remove_lineage(features_dir: Path, day: date) -> None:
    """Un-commit ``day`` before its tables change: a failed build leaves it "not built"."""
    lineage_path(features_dir, day).unlink(missing_ok=True)


def read_lineage(features_dir: Path, day: date) -> Lineage | None:
    path = lineage_path(features_dir, day)
    if not path.exists():
        return None
    return _from_record(json.loads(path.read_text()))


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


# --- committing a day: stage everything, then one manifest, then atomic swaps ----------


def _pending_dir(features_dir: Path) -> Path:
    """Where builds stage their days and their commit manifests (``_state/_pending``)."""
    return ft.FeatureTables(features_dir).state_root / PENDING_DIR


def staging_root(features_dir: Path, day: date) -> Path:
    """Where the build of ``day`` writes; laid out like ``features/`` (tables, ``_state/``)."""
    return partition_path(_pending_dir(features_dir), day)


def _manifest_path(features_dir: Path, day: date) -> Path:
    return _pending_dir(features_dir) / f"dt={day.isoformat()}.json"


def _staged_partitions(root: Path) -> list[str]:
    """The partitions under a staging root, as paths relative to it (tables, then state)."""
    folders = [ft.table_dir(root, t) for t in ft.PUBLIC_TABLES]
    folders += [ft.state_dir(root, t) for t in ft.STATE_TABLES]
    return [
        ft.partition_path(folder, d).relative_to(root).as_posix()
        for folder in folders
        for d in ft.partition_days(folder)
    ]


def discard_staging(features_dir: Path, day: date) -> None:
    """Drop what a build of ``day`` staged before its commit point (nothing was committed)."""
    shutil.rmtree(staging_root(features_dir, day), ignore_errors=True)


def commit_day(features_dir: Path, lineage: Lineage) -> None:
    """Commit everything staged for ``lineage.day`` with its lineage record, as one step.

    Writing the manifest is the commit point; :func:`_apply` then swaps the staged partitions in.
    """
    root = staging_root(features_dir, lineage.day)
    manifest = {"lineage": _as_record(lineage), "partitions": _staged_partitions(root)}
    atomic_write_text(
        _manifest_path(features_dir, lineage.day), json.dumps(manifest, indent=1, sort_keys=True)
    )
    crash_point("day-committed")
    _apply(features_dir, lineage.day)


def _apply(features_dir: Path, day: date) -> None:
    """Publish the committed build of ``day``; safe to repeat after a crash part-way.

    Each staged file is hard-linked into the swap (not moved), so it stays in the staging
    folder until the whole commit is done and a repeat swaps in the same bytes again.
    """
    path = _manifest_path(features_dir, day)
    manifest = json.loads(path.read_text())
    root = staging_root(features_dir, day)
    remove_lineage(features_dir, day)
    for relative in manifest["partitions"]:
        with staging_dir(features_dir / relative) as target:
            os.link(root / relative / ft.PART_FILE, target / ft.PART_FILE)
        crash_point("partition-swapped")
    write_lineage(features_dir, _from_record(manifest["lineage"]))
    shutil.rmtree(root)
    path.unlink()
    fsync_dir(path.parent)


def recover_commits(features_dir: Path) -> list[date]:
    """Finish the commits a killed build left applied part-way; drop uncommitted staging.

    Run before every build. Returns the days whose commit was finished here.
    """
    pending = _pending_dir(features_dir)
    if not pending.is_dir():
        return []
    finished = []
    for entry in sorted(pending.iterdir()):
        if entry.name.startswith("dt=") and entry.name.endswith(".json"):
            day = date.fromisoformat(entry.name[3:-5])
            _apply(features_dir, day)
            finished.append(day)
    for entry in pending.iterdir():  # staged, never committed: the build died before
        if entry.name.startswith("dt=") and entry.is_dir():
            shutil.rmtree(entry)
    return finished
