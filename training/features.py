"""Point-in-time user and item features for training and offline evaluation.

A prediction made on day D may only use what was known at the end of D-1, which is
exactly what serving reads online on day D (the daily run for D-1 materialized it). The
feature tables hold one full-snapshot partition per day (``user_features/dt=P``,
``item_features/dt=P``, written by ``grank features build``), so the value for a
prediction on day D is the partition P = D-1, or the latest earlier one still within
the views' TTL (Feast returns nothing older: ``features/feast_repo/definitions.py``).

The tables are read once into dense arrays indexed by (day, entity): every training
window and evaluation query then gathers its features by index. Memory is
days x entities x features (ML-1M, all 1,040 days: ~125 MB of user and ~80 MB of item
features); a warm start reads only the days it trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from common.errors import UserFacingError
from features.feature_tables import ITEM_FEATURES, USER_FEATURES, FeatureTables
from features.lake import EPOCH
from training.inputs import InputSpec, hash_category, scale_numeric, standardize_items
from training.model import UserContext

USER_TABLE = USER_FEATURES
ITEM_TABLE = ITEM_FEATURES


@dataclass(frozen=True)
class FeatureHistory:
    """Features by (as-of day, entity); index 0 of every day axis is "missing" (all
    zeros), and so is user slot 0 (a user the tables do not know).

    ``first_day`` is the day number of as-of index 1. A prediction on day D reads as-of
    index ``D - 1 - first_day + 1`` (clipped to the missing row before the history).
    """

    spec: InputSpec
    first_day: int
    user_ids: np.ndarray  # sorted
    user_numeric: np.ndarray  # [days+1, users+1, Fu] float32, scaled
    user_categorical: np.ndarray  # [days+1, users+1, Cu] int64 buckets
    # [days+1, item rows, Fi] float32, scaled: every column of ``spec.item_columns`` (the
    # Ranker's, the prior's or the baselines' counts), not only the Ranker's numeric ones
    item_table: torch.Tensor

    def _asof(self, days: np.ndarray, n_days: int) -> np.ndarray:
        index = np.asarray(days, dtype=np.int64) - 1 - self.first_day + 1
        return np.where((index >= 1) & (index < n_days), index, 0)

    def user_context(
        self,
        long_seq: np.ndarray,
        long_codes: np.ndarray | None,
        user_ids: np.ndarray,
        days: np.ndarray,
        device: torch.device,
    ) -> UserContext:
        """The model's user-side inputs for predictions of ``user_ids`` made on ``days``."""
        spec = self.spec
        numeric = categorical = None
        if spec.uses_user_features:
            slot = self.user_slots(user_ids)
            # a user the history has never seen reads the all-zero "missing" slot
            asof = np.where(slot > 0, self._asof(days, self.user_numeric.shape[0]), 0)
            if spec.user_numeric:
                numeric = torch.as_tensor(self.user_numeric[asof, slot], device=device)
            if spec.user_categorical:
                categorical = torch.as_tensor(self.user_categorical[asof, slot], device=device)
        return UserContext(
            long_seq=torch.as_tensor(long_seq, device=device),
            long_codes=None if long_codes is None else torch.as_tensor(long_codes, device=device),
            numeric=numeric,
            categorical=categorical,
        )

    def user_ranges(self, last_day: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of each profile feature over known users, predictions up to
        ``last_day`` (a model remembers them as its training range)."""
        upto = int(np.clip(last_day - self.first_day, 1, self.user_numeric.shape[0] - 1))
        rows = self.user_numeric[1 : upto + 1, 1:].reshape(-1, self.user_numeric.shape[2])
        if len(rows) == 0:
            width = self.user_numeric.shape[2]
            return torch.full((width,), -torch.inf), torch.full((width,), torch.inf)
        return torch.as_tensor(rows.min(axis=0)), torch.as_tensor(rows.max(axis=0))

    def user_slots(self, user_ids: np.ndarray) -> np.ndarray:
        """Slot of each user in the user tables (0: unknown, the all-zero slot)."""
        index = np.searchsorted(self.user_ids, user_ids)
        inside = index < len(self.user_ids)
        found = np.zeros(len(user_ids), dtype=bool)
        found[inside] = self.user_ids[index[inside]] == np.asarray(user_ids)[inside]
        return np.where(found, index + 1, 0)

    def item_features(self, days: np.ndarray, candidates: torch.Tensor) -> torch.Tensor | None:
        """[B, K, Fi] features of ``candidates`` [B, K] for predictions made on ``days`` [B]."""
        if not self.spec.item_columns:
            return None
        table = self.item_table
        asof = torch.as_tensor(self._asof(days, table.shape[0]), device=table.device)
        rows = candidates.clamp(0, table.shape[1] - 1)
        return table[asof[:, None], rows]


def no_features(spec: InputSpec, n_item_rows: int) -> FeatureHistory:
    """A history where every feature is missing (a sequence-only model needs nothing else)."""
    return FeatureHistory(
        spec=spec,
        first_day=0,
        user_ids=np.zeros(0, dtype=np.int64),
        user_numeric=np.zeros((1, 1, len(spec.user_numeric)), np.float32),
        user_categorical=np.zeros((1, 1, len(spec.user_categorical)), np.int64),
        item_table=torch.zeros(1, n_item_rows, len(spec.item_columns)),
    )


def read_feature_history(
    features_dir: Path,
    spec: InputSpec,
    first: date,
    last: date,
    n_item_rows: int,
    ttl_days: int,
    device: torch.device,
) -> FeatureHistory:
    """The features for predictions on days ``first..last`` (partitions ``first-1..last-1``).

    A missing partition (a day without events, hence without a build) is filled from the
    latest earlier one while it is within ``ttl_days``, as Feast's TTL serves it online.
    """
    tables = FeatureTables(features_dir)
    asof_first = first - timedelta(days=1)
    n_days = (last - first).days + 1
    user_cols = [*spec.user_numeric, *spec.user_categorical]
    user_tables = (
        _read_days(tables, USER_TABLE, asof_first, n_days, ttl_days, user_cols, "user_id")
        if user_cols
        else [None] * n_days
    )
    item_tables = (
        _read_days(
            tables,
            ITEM_TABLE,
            asof_first,
            n_days,
            ttl_days,
            list(spec.item_columns),
            "item_id",
        )
        if spec.item_columns
        else []
    )
    present = [t for t in user_tables if t is not None]
    user_ids = (
        np.unique(np.concatenate([t["user_id"].to_numpy() for t in present]))
        if present
        else np.zeros(0, dtype=np.int64)
    )
    user_numeric = np.zeros((n_days + 1, len(user_ids) + 1, len(spec.user_numeric)), np.float32)
    user_categorical = np.zeros(
        (n_days + 1, len(user_ids) + 1, len(spec.user_categorical)), np.int64
    )
    for index, table in enumerate(user_tables, start=1):
        if table is None:
            continue
        slot = np.searchsorted(user_ids, table["user_id"].to_numpy()) + 1
        for c, column in enumerate(spec.user_numeric):
            user_numeric[index, slot, c] = scale_numeric(_floats(table[column]))
        for c, column in enumerate(spec.user_categorical):
            values = table[column].to_pylist()
            user_categorical[index, slot, c] = [
                hash_category(column, v, spec.categorical_buckets) for v in values
            ]
    item_table = np.zeros((n_days + 1, n_item_rows, len(spec.item_columns)), np.float32)
    for index, table in enumerate(item_tables, start=1):
        if table is None:
            continue
        ids = table["item_id"].to_numpy()
        inside = ids < n_item_rows
        day_table = np.zeros((n_item_rows, len(spec.item_columns)), np.float32)
        for c, column in enumerate(spec.item_columns):
            day_table[ids[inside], c] = scale_numeric(_floats(table[column]))[inside]
        item_table[index] = standardize_items(day_table)
    return FeatureHistory(
        spec=spec,
        first_day=(asof_first - EPOCH).days,
        user_ids=user_ids,
        user_numeric=user_numeric,
        user_categorical=user_categorical,
        item_table=torch.as_tensor(item_table, device=device),
    )


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _read_days(
    feature_tables: FeatureTables,
    table: str,
    first: date,
    n_days: int,
    ttl_days: int,
    columns: list[str],
    key: str,
) -> list[pa.Table | None]:
    """The partition serving each as-of day ``first + i`` (None: nothing within the TTL)."""
    tables: list[pa.Table | None] = []
    latest: tuple[date, pa.Table] | None = None
    for i in range(n_days):
        day = first + timedelta(days=i)
        path = feature_tables.partition(table, day)
        if path.is_dir():
            try:
                latest = (day, pq.read_table(path, columns=[key, *columns]))
            except (pa.ArrowInvalid, KeyError) as exc:
                raise UserFacingError(f"{path} lacks the model's feature columns: {exc}") from exc
        usable = latest is not None and (day - latest[0]).days < ttl_days
        tables.append(latest[1] if usable and latest is not None else None)
    return tables
