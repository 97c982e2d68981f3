"""Where /recommend gets a user's history and features: the Feast online store.

The Generator reads the short sequence (feature service ``grank_generator_v1``), the
Ranker the long one (``grank_ranker_v1``); a model trained with features also reads the
long sequence's event types and values (behaviour types) and the user's profile
(``grank_user_context_v1``), and its Ranker the candidates' item features
(``grank_item_context_v1``). Serving talks to the Feast SDK directly, not to
``features/`` (layering: serving never imports the Spark side). Any object with
``get(user_ids, user_columns)`` can stand in, e.g. an in-memory table for benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import UserFacingError

GENERATOR_SERVICE = "grank_generator_v1"
RANKER_SERVICE = "grank_ranker_v1"
USER_CONTEXT_SERVICE = "grank_user_context_v1"
ITEM_CONTEXT_SERVICE = "grank_item_context_v1"
SERVICES = (GENERATOR_SERVICE, RANKER_SERVICE, USER_CONTEXT_SERVICE, ITEM_CONTEXT_SERVICE)


@dataclass(frozen=True)
class UserHistory:
    """A user's item ids, oldest first: ``short`` feeds the Generator, ``long`` the Ranker.

    ``event_types``/``values``/``times`` (unix microseconds) are aligned with ``long``
    (empty when the store has none); ``features`` holds the user's profile columns as the
    online store returned them.
    """

    short: tuple[int, ...]
    long: tuple[int, ...]
    event_types: tuple[str, ...] = ()
    values: tuple[float, ...] = ()
    times: tuple[int, ...] = ()
    features: Mapping[str, Any] = field(default_factory=dict)


class UserSource(Protocol):
    """Batched lookup of user histories; a user without features maps to None."""

    def get(
        self, user_ids: Sequence[int], user_columns: Sequence[str] = ()
    ) -> dict[int, UserHistory | None]: ...


class ItemSource(Protocol):
    """Batched lookup of item features (a model whose Ranker reads none never calls it)."""

    def item_features(
        self, item_ids: np.ndarray, columns: Sequence[str]
    ) -> dict[str, list[Any]]: ...


class StaticUserSource:
    """Histories held in memory (benchmarks and tests of the serving path without a store)."""

    def __init__(
        self,
        table: Mapping[int, UserHistory],
        items: Mapping[str, Mapping[int, Any]] | None = None,
    ) -> None:
        self._table = dict(table)
        self._items = {name: dict(values) for name, values in (items or {}).items()}

    def get(
        self, user_ids: Sequence[int], user_columns: Sequence[str] = ()
    ) -> dict[int, UserHistory | None]:
        return {user: self._table.get(user) for user in user_ids}

    def item_features(self, item_ids: np.ndarray, columns: Sequence[str]) -> dict[str, list[Any]]:
        return {c: [self._items.get(c, {}).get(int(i)) for i in item_ids] for c in columns}


class FeastUserSource:
    """Reads sequences, profiles and item features for many entities in one store call."""

    def __init__(self, repo_path: Path) -> None:
        from feast import FeatureStore

        self._store = FeatureStore(repo_path=str(repo_path))
        self._refs: dict[str, str] = {}  # feature name -> "view:feature"
        for service_name in SERVICES:
            try:
                service = self._store.get_feature_service(service_name)
            except Exception as exc:  # FeatureServiceNotFoundException: an older repository
                if service_name in (GENERATOR_SERVICE, RANKER_SERVICE):
                    raise UserFacingError(
                        f"Feast feature service {service_name} is not registered: run"
                        " `grank features register`"
                    ) from exc
                continue
            for projection in service.feature_view_projections:
                for feature in projection.features:
                    self._refs.setdefault(
                        feature.name, f"{projection.name_to_use()}:{feature.name}"
                    )
        for required in ("short_item_seq", "item_seq"):
            self._ref(required)

    def _ref(self, feature: str) -> str:
        if feature not in self._refs:
            raise UserFacingError(f"the Feast feature services define no feature {feature!r}")
        return self._refs[feature]

    def get(
        self, user_ids: Sequence[int], user_columns: Sequence[str] = ()
    ) -> dict[int, UserHistory | None]:
        if not user_ids:
            return {}
        names = ["short_item_seq", "item_seq"]
        names += [n for n in ("event_type_seq", "value_seq", "ts_seq") if n in self._refs]
        names += list(user_columns)
        refs = sorted({self._ref(name) for name in names})
        response = self._store.get_online_features(
            features=refs,
            entity_rows=[{"user_id": int(user)} for user in user_ids],
            full_feature_names=True,
        ).to_dict()
        column = {name: response[self._ref(name).replace(":", "__")] for name in names}
        missing = [None] * len(user_ids)
        result: dict[int, UserHistory | None] = {}
        for row, user in enumerate(user_ids):
            short, long = column["short_item_seq"][row], column["item_seq"][row]
            if short is None and long is None:
                result[int(user)] = None
                continue
            result[int(user)] = UserHistory(
                short=tuple(int(i) for i in short or ()),
                long=tuple(int(i) for i in long or ()),
                event_types=tuple(column.get("event_type_seq", missing)[row] or ()),
                values=tuple(
                    float("nan") if v is None else float(v)
                    for v in column.get("value_seq", missing)[row] or ()
                ),
                times=tuple(int(t) for t in column.get("ts_seq", missing)[row] or ()),
                features={name: column[name][row] for name in user_columns},
            )
        return result

    def item_features(self, item_ids: np.ndarray, columns: Sequence[str]) -> dict[str, list[Any]]:
        refs = [self._ref(name) for name in columns]
        response = self._store.get_online_features(
            features=refs,
            entity_rows=[{"item_id": int(item)} for item in item_ids],
            full_feature_names=True,
        ).to_dict()
        return {
            name: response[ref.replace(":", "__")] for name, ref in zip(columns, refs, strict=True)
        }
