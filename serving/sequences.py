"""Where /recommend gets a user's history: the Feast online store, behind a small protocol.

The Generator reads the short sequence (feature service ``grank_generator_v1``) and the
Ranker the long one (``grank_ranker_v1``). Serving talks to the Feast SDK directly, not
to ``features/`` (layering: serving never imports the Spark side). Any object with
``get(user_ids)`` can stand in, e.g. an in-memory table for benchmarks without Feast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.errors import UserFacingError

GENERATOR_SERVICE = "grank_generator_v1"
RANKER_SERVICE = "grank_ranker_v1"


@dataclass(frozen=True)
class UserSequences:
    """A user's item ids, oldest first: ``short`` feeds the Generator, ``long`` the Ranker."""

    short: tuple[int, ...]
    long: tuple[int, ...]


class SequenceSource(Protocol):
    """Batched lookup of user histories; a user without features maps to None."""

    def get(self, user_ids: Sequence[int]) -> dict[int, UserSequences | None]: ...


class StaticSequenceSource:
    """Histories held in memory (benchmarks of the serving path without a feature store)."""

    def __init__(self, table: Mapping[int, UserSequences]) -> None:
        self._table = dict(table)

    def get(self, user_ids: Sequence[int]) -> dict[int, UserSequences | None]:
        return {user: self._table.get(user) for user in user_ids}


class FeastSequenceSource:
    """Reads ``short_item_seq`` and ``item_seq`` for many users in one online-store call."""

    def __init__(self, repo_path: Path) -> None:
        from feast import FeatureStore

        self._store = FeatureStore(repo_path=str(repo_path))
        refs: list[str] = []
        for service_name in (GENERATOR_SERVICE, RANKER_SERVICE):
            service = self._store.get_feature_service(service_name)
            for projection in service.feature_view_projections:
                refs.extend(f"{projection.name_to_use()}:{f.name}" for f in projection.features)
        self._short_ref = _find_ref(refs, "short_item_seq")
        self._long_ref = _find_ref(refs, "item_seq")
        self._refs = sorted(set(refs))

    def get(self, user_ids: Sequence[int]) -> dict[int, UserSequences | None]:
        if not user_ids:
            return {}
        response = self._store.get_online_features(
            features=self._refs,
            entity_rows=[{"user_id": int(user)} for user in user_ids],
            full_feature_names=True,
        ).to_dict()
        short_col = response[self._short_ref.replace(":", "__")]
        long_col = response[self._long_ref.replace(":", "__")]
        result: dict[int, UserSequences | None] = {}
        for user, short, long in zip(user_ids, short_col, long_col, strict=True):
            result[int(user)] = _to_sequences(short, long)
        return result


def _find_ref(refs: list[str], feature: str) -> str:
    """The one ``view:feature`` reference for ``feature`` among the services' features."""
    matches = [ref for ref in refs if ref.split(":", 1)[1] == feature]
    if not matches:
        raise UserFacingError(f"Feast feature services define no feature {feature!r}")
    return matches[0]


def _to_sequences(short: Any, long: Any) -> UserSequences | None:
    """None when the store has no row (both lists missing), else the integer sequences."""
    if short is None and long is None:
        return None
    return UserSequences(
        short=tuple(int(i) for i in short or ()), long=tuple(int(i) for i in long or ())
    )
