"""The model registry: the one owner of ``models/`` on disk.

Layout under ``models_dir``::

    checkpoints/<id>/            immutable: model.safetensors + manifest.json, never rewritten;
                                 <id> = <test day>-<first 12 hex of the weights' sha256>
    candidates/<test day>        the checkpoint id the last `grank train` produced for that day
    evaluations/<test day>/      the gate's report for that day's candidate (metrics, chart)
    PUBLISHED                    the id of the checkpoint that serving and warm starts use
                                 (before any model passed: warm starts continue the
                                 latest candidate, :meth:`ModelRegistry.warm_start_base`)
    published.log                append-only JSON lines: every move of PUBLISHED, and why
    .scratch/                    checkpoints being written (hidden; a killed writer leaves
                                 only a hidden folder here, never a half checkpoint)

Why immutable checkpoints: a pointer that names a folder someone may rewrite is not a
pointer to a model. Training writes into ``.scratch``; only a finished, verified checkpoint
is renamed into ``checkpoints/``, under a name derived from its weights, so re-running a
day that reproduces the same weights lands on the same folder and a different result on a
new one. ``PUBLISHED`` therefore always names an intact checkpoint, whatever was killed.

Why ``PUBLISHED`` only moves forward in test day through the gate: re-running or
backfilling an old day must never put an older model back into serving (and under the
next day's warm start). Moving it anywhere else takes an explicit, logged
:meth:`ModelRegistry.promote` (``grank model promote`` / ``rollback``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text, fsync_dir
from common.errors import UserFacingError
from training.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, read_manifest, save_checkpoint
from training.model import GRank

PUBLISHED_FILE = "PUBLISHED"
LOG_FILE = "published.log"
CHECKPOINT_ID = re.compile(r"^(\d{4}-\d{2}-\d{2})-([0-9a-f]{12})$")
STALE_SCRATCH_S = 24 * 3600.0


@dataclass(frozen=True)
class PointerMove:
    """One line of ``published.log``: PUBLISHED moved from ``previous`` to ``checkpoint``."""

    at: str
    action: str
    previous: str | None
    checkpoint: str | None
    reason: str


def checkpoint_day(checkpoint_id: str) -> date:
    """The test day a checkpoint id starts with (its model was tested on that day)."""
    match = CHECKPOINT_ID.fullmatch(checkpoint_id)
    if match is None:
        raise UserFacingError(
            f"invalid checkpoint id {checkpoint_id!r}: expected YYYY-MM-DD-<12 hex digits>"
        )
    return date.fromisoformat(match.group(1))


class ModelRegistry:
    """Checkpoints, the per-day candidates, the gate's reports and the PUBLISHED pointer."""

    def __init__(self, models_dir: Path) -> None:
        self.root = models_dir

    # ---------------------------------------------------------------- layout
    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_path(self, checkpoint_id: str) -> Path:
        """The folder of ``checkpoint_id`` (the id is validated: it cannot escape the folder)."""
        checkpoint_day(checkpoint_id)
        return self.checkpoints_dir / checkpoint_id

    def evaluation_dir(self, day: date) -> Path:
        """Where the gate writes its report for the candidate of ``day``."""
        return self.root / "evaluations" / day.isoformat()

    @property
    def candidates_dir(self) -> Path:
        return self.root / "candidates"

    def _candidate_file(self, day: date) -> Path:
        return self.candidates_dir / day.isoformat()

    # ----------------------------------------------------------- checkpoints
    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        """A hidden folder to build a checkpoint in; removed unless moved into place."""
        scratch_root = self.root / ".scratch"
        scratch_root.mkdir(parents=True, exist_ok=True)
        self._drop_stale_scratch(scratch_root)
        folder = scratch_root / f"{os.getpid()}-{time.monotonic_ns()}"
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _drop_stale_scratch(scratch_root: Path) -> None:
        """Scratch left by killed writers: harmless (hidden), but not kept forever."""
        now = time.time()
        for entry in scratch_root.iterdir():
            try:
                if now - entry.stat().st_mtime > STALE_SCRATCH_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                continue

    def commit(self, model: GRank, manifest: dict[str, Any], test_day: date) -> str:
        """Write ``model`` as a new immutable checkpoint and make it the candidate of ``test_day``.

        Returns its id. The same weights committed twice (a deterministic re-run) map to
        the same id; the existing folder is kept as it is, never rewritten.
        """
        with self._scratch() as scratch:
            written = save_checkpoint(model, scratch, manifest)
            digest = str(written["files"][WEIGHTS_FILE])
            checkpoint_id = f"{test_day.isoformat()}-{digest[:12]}"
            target = self.checkpoint_path(checkpoint_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.rename(scratch, target)
                except OSError:
                    if not target.exists():  # not a concurrent writer of the same weights
                        raise
                fsync_dir(target.parent)
        atomic_write_text(self._candidate_file(test_day), checkpoint_id + "\n")
        return checkpoint_id

    def candidate(self, day: date) -> str:
        """The checkpoint the last ``grank train --date day`` produced."""
        path = self._candidate_file(day)
        if not path.is_file():
            raise UserFacingError(
                f"no trained model for {day} in {self.root}: run `grank train --date {day}` first"
            )
        checkpoint_id = path.read_text(encoding="utf-8").strip()
        self._require(checkpoint_id, f"{path} names")
        return checkpoint_id

    def manifest(self, checkpoint_id: str) -> dict[str, Any]:
        return read_manifest(self.checkpoint_path(checkpoint_id))

    def checkpoint_ids(self) -> list[str]:
        """Every complete checkpoint, oldest test day first."""
        if not self.checkpoints_dir.is_dir():
            return []
        ids = [
            p.name
            for p in self.checkpoints_dir.iterdir()
            if CHECKPOINT_ID.fullmatch(p.name) and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(ids)

    def _require(self, checkpoint_id: str, context: str) -> None:
        folder = self.checkpoint_path(checkpoint_id)
        if not (folder / MANIFEST_FILE).is_file():
            raise UserFacingError(f"{context} {checkpoint_id!r}, which is not a checkpoint")

    # ------------------------------------------------------------- PUBLISHED
    def published(self) -> str | None:
        """The id PUBLISHED names, or None before any model passed the gate."""
        path = self.root / PUBLISHED_FILE
        if not path.is_file():
            return None
        checkpoint_id = path.read_text(encoding="utf-8").strip()
        if not CHECKPOINT_ID.fullmatch(checkpoint_id):
            raise UserFacingError(f"{path} names {checkpoint_id!r}, which is not a checkpoint id")
        self._require(checkpoint_id, f"{path} names")
        return checkpoint_id

    def would_publish(self, checkpoint_id: str) -> tuple[bool, str]:
        """Whether the gate may move PUBLISHED to ``checkpoint_id``, and why (no change made).

        A candidate tested on a day before the published model's (a re-run or backfill of
        an old day) never replaces it; the same day (a re-run of the newest day) may.
        """
        self._require(checkpoint_id, "cannot publish")
        current = self.published()
        if current is not None and checkpoint_day(checkpoint_id) < checkpoint_day(current):
            return False, (
                f"PUBLISHED stays {current}: {checkpoint_id} was tested on an older day"
                " (re-runs and backfills never move serving back; `grank model promote`"
                " does, explicitly)"
            )
        return True, f"PUBLISHED -> {checkpoint_id}"

    def publish_if_newer(self, checkpoint_id: str, reason: str) -> tuple[bool, str]:
        """The gate's move: PUBLISHED -> ``checkpoint_id`` if :meth:`would_publish` allows.

        Returns (moved, why).
        """
        allowed, why = self.would_publish(checkpoint_id)
        if allowed and self.published() != checkpoint_id:
            self._move(checkpoint_id, "gate", reason)
        return allowed, why

    def promote(self, checkpoint_id: str | None, action: str, reason: str) -> str | None:
        """Point PUBLISHED at any checkpoint (or at nothing), explicitly; logged.

        Used by ``grank model promote|rollback`` and by snapshot rollback, which moves the
        model pointer together with the snapshot it rolls back to.
        """
        if checkpoint_id is not None:
            self._require(checkpoint_id, "cannot promote")
        previous = self.published()
        if previous != checkpoint_id:
            self._move(checkpoint_id, action, reason)
        return previous

    def previously_published(self) -> str | None:
        """The checkpoint PUBLISHED named before its current value (for a rollback)."""
        current = self.published()
        for move in reversed(self.history()):
            if move.checkpoint == current and move.previous != current:
                return move.previous
        return None

    def _move(self, checkpoint_id: str | None, action: str, reason: str) -> None:
        """Replace PUBLISHED atomically, then append the move to the log."""
        previous = self.published()
        pointer = self.root / PUBLISHED_FILE
        if checkpoint_id is None:
            pointer.unlink(missing_ok=True)
            fsync_dir(self.root)
        else:
            atomic_write_text(pointer, checkpoint_id + "\n")
        move = PointerMove(
            at=datetime.now(UTC).isoformat(timespec="seconds"),
            action=action,
            previous=previous,
            checkpoint=checkpoint_id,
            reason=reason,
        )
        with open(self.root / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(json.dumps(move.__dict__, sort_keys=True) + "\n")
            log.flush()
            os.fsync(log.fileno())

    def history(self) -> list[PointerMove]:
        """Every move of PUBLISHED, oldest first (unreadable lines are skipped)."""
        path = self.root / LOG_FILE
        if not path.is_file():
            return []
        moves = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                moves.append(PointerMove(**json.loads(line)))
            except (ValueError, TypeError):
                continue
        return moves

    def warm_start_base(self, day: date) -> str | None:
        """The model a run for ``day`` continues: :meth:`base_for`, or, while no model has
        ever passed the gate, the candidate of the latest day before ``day``.

        A refused bootstrap is the best model there is and only lacked training time; the
        next day continues it (a warm start on the new days) instead of starting over, so
        training accumulates across days until a candidate clears the gate. Days are
        taken in order, so a re-run of ``day`` finds the same candidate as its first run.
        """
        if self.published() is not None:
            return self.base_for(day)
        earlier = [d for d in self._candidate_days() if d < day]
        return self.candidate(earlier[-1]) if earlier else None

    def _candidate_days(self) -> list[date]:
        """The days a candidate was trained for, oldest first."""
        if not self.candidates_dir.is_dir():
            return []
        days = []
        for path in self.candidates_dir.iterdir():
            with contextlib.suppress(ValueError):  # a stray file is not a candidate
                days.append(date.fromisoformat(path.name))
        return sorted(days)

    def base_for(self, day: date) -> str | None:
        """The model a run for ``day`` warm-starts from and is compared with.

        Normally PUBLISHED itself. When it was tested on ``day`` or later (a re-run or a
        backfill of an older day), follow its ``warm_start_from`` lineage back to the first
        model tested before ``day``: the base the original run of ``day`` saw, so a re-run
        reproduces it. A lineage that starts from scratch means ``day`` started from scratch.
        """
        checkpoint_id = self.published()
        while checkpoint_id is not None:
            if checkpoint_day(checkpoint_id) < day:
                return checkpoint_id
            checkpoint_id = self.manifest(checkpoint_id).get("warm_start_from")
        return None
