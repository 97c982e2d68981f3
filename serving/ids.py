"""External ids at the API's edge: clients send and receive their own ids, the model dense ones.

Datasets ingested with ``string`` or ``int64`` ids keep append-only id maps beside the
lake (``common/idmap.py``); datasets whose ids are dense already (the MovieLens replays)
have none, and ids pass through unchanged. The maps only grow, so the newest map on disk
always covers every item of any snapshot built before it; it is re-read when its file
changes (one ``stat`` per lookup), without a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from common import idmap

ExternalId = int | str


class UnknownIdKindError(ValueError):
    """The id's type is not the one this dataset's ids have (a string for integer ids)."""


class ExternalIds:
    """Translate a request's user id to a dense id and result item ids back."""

    def __init__(self, idmaps_dir: Path | None) -> None:
        self._dir = idmaps_dir
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[int, idmap.IdMap | None]] = {}

    def _map(self, entity: str) -> idmap.IdMap | None:
        if self._dir is None:
            return None
        stamp = idmap.mtime_ns(self._dir, entity)
        cached = self._loaded.get(entity)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with self._lock:
            loaded = idmap.load(self._dir, entity) if stamp else None
            self._loaded[entity] = (stamp, loaded)
        return loaded

    def user_dense(self, user_id: ExternalId) -> int:
        """The model's id of ``user_id``; 0 (no history: the popular fallback) when unknown."""
        users = self._map("user")
        if users is None:
            if not isinstance(user_id, int):
                raise UnknownIdKindError("user ids of this dataset are integers")
            return user_id
        wanted = str if users.id_type == "string" else int
        if not isinstance(user_id, wanted):
            raise UnknownIdKindError(f"user ids of this dataset are {users.id_type} values")
        return users.dense(user_id)

    def items_external(self, dense_ids: Sequence[int]) -> list[ExternalId]:
        """The clients' ids of the recommended items."""
        items = self._map("item")
        if items is None:
            return [int(i) for i in dense_ids]
        return [value for value in items.to_external(dense_ids) if value is not None]
