"""Persistent, append-only maps from external ids (strings, sparse 64-bit) to dense model ids.

The model's embedding table has one row per dense id (0 = padding), so ids a team
exports (``"sku-8812"``, ``9_118_338_201_774``) are translated on the way in and back
on the way out. One map per entity (``user``, ``item``) lives beside the lake as
``idmaps/<entity>.parquet`` with one column ``external_id``; the row number + 1 is the
dense id. The map only ever grows: an id keeps its dense id for good (features, models
and snapshots of earlier days stay valid), and new ids are appended by writing the whole
file to a hidden temporary sibling and ``os.replace``-ing it, under a lock file, so a
reader sees the old map or the new one and two writers never lose each other's ids.

Serving reads these maps (it may import ``common``, never ``features``) to accept and
return external ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.atomic import atomic_write_bytes
from common.errors import UserFacingError

ENTITIES = ("user", "item")
COLUMN = "external_id"
ID_TYPES = {"string": pa.string(), "int64": pa.int64()}


def idmap_path(idmaps_dir: Path, entity: str) -> Path:
    """File of one entity's map (``<idmaps_dir>/<entity>.parquet``)."""
    if entity not in ENTITIES:
        raise ValueError(f"unknown entity {entity!r}; known: {', '.join(ENTITIES)}")
    return idmaps_dir / f"{entity}.parquet"


@dataclass
class IdMap:
    """One entity's map in memory: ``externals[i]`` has dense id ``i + 1``."""

    externals: pa.Array
    _index: dict[Any, int] | None = field(default=None, repr=False)

    @property
    def id_type(self) -> str:
        return "string" if pa.types.is_string(self.externals.type) else "int64"

    def __len__(self) -> int:
        return len(self.externals)

    def dense(self, external: object) -> int:
        """The dense id of one external id; 0 (padding: an unknown user) when absent."""
        if self._index is None:  # built on first use: ingestion only needs to_dense
            self._index = {value: i + 1 for i, value in enumerate(self.externals.to_pylist())}
        return self._index.get(external, 0)

    def to_dense(self, externals: pa.Array) -> np.ndarray:
        """Dense ids of an array of external ids (0 where unknown), vectorised."""
        positions = pc.index_in(externals.cast(self.externals.type), value_set=self.externals)
        return np.asarray(positions.fill_null(-1).to_numpy(zero_copy_only=False)) + 1

    def to_external(self, dense_ids: Sequence[int] | np.ndarray) -> list[Any]:
        """External ids of dense ids (``None`` for 0 or ids beyond the map)."""
        values = self.externals
        return [
            values[int(i) - 1].as_py() if 0 < int(i) <= len(values) else None for i in dense_ids
        ]


def load(idmaps_dir: Path, entity: str) -> IdMap | None:
    """The stored map of ``entity``, or None when this lake uses its ids as given."""
    path = idmap_path(idmaps_dir, entity)
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserFacingError(f"id map {path} is unreadable: {exc}") from exc
    return IdMap(table.column(COLUMN).combine_chunks())


@contextlib.contextmanager
def _locked(idmaps_dir: Path) -> Iterator[None]:
    """An exclusive lock over the maps of this lake (one writer at a time)."""
    idmaps_dir.mkdir(parents=True, exist_ok=True)
    with open(idmaps_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def extend(idmaps_dir: Path, entity: str, externals: pa.Array, id_type: str) -> IdMap:
    """Append the ids of ``externals`` the map lacks (first-seen order); return the new map.

    Existing ids keep their dense ids. The map's type is fixed by its first write: a
    later ingest declaring another type is refused rather than mixing ``"42"`` and ``42``.
    """
    arrow_type = ID_TYPES[id_type]
    with _locked(idmaps_dir):
        current = load(idmaps_dir, entity)
        if current is not None and current.id_type != id_type:
            raise UserFacingError(
                f"the {entity} id map holds {current.id_type} ids, but the dataset config"
                f" declares {id_type}: a map's id type cannot change"
            )
        old = current.externals if current is not None else pa.array([], arrow_type)
        if externals.null_count:
            raise UserFacingError(f"{externals.null_count} {entity} ids are missing (null)")
        incoming = pc.unique(externals.cast(arrow_type))
        new = incoming.filter(pc.invert(pc.is_in(incoming, value_set=old)))
        if len(new) == 0 and current is not None:
            return current
        merged = pa.concat_arrays([old, new]) if len(old) else new
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({COLUMN: merged}), sink, compression="zstd")
        atomic_write_bytes(idmap_path(idmaps_dir, entity), sink.getvalue().to_pybytes())
        return IdMap(merged)


def mtime_ns(idmaps_dir: Path, entity: str) -> int:
    """Change stamp of a map file (0 when absent): readers reload when it moves."""
    try:
        return os.stat(idmap_path(idmaps_dir, entity)).st_mtime_ns
    except FileNotFoundError:
        return 0
