"""How the feature store's values become the model's input tensors, for training and serving.

Training (point in time, from the offline tables) and serving (online, through Feast) must
turn the same feature values into the same numbers, or the model serves on inputs it never
saw. Every encoding therefore lives here, once, and both sides call it: event codes from
(event type, value, time), the scaling of numeric features, the hashing of categorical
ones. The model's config carries the :class:`InputSpec` it was trained with, so serving
encodes with the checkpoint's own spec, not with today's settings.

This module is part of the model definition (serving imports it): numpy only, no Spark,
Feast or pandas.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# An event code holds the event's behaviour bits below TIME_SHIFT and, for a model with
# time gaps, the event's unix second above: one int64 per event carries both through
# every window, query and online lookup (padding: 0).
TIME_SHIFT = 8
US_PER_SECOND = 1_000_000


@dataclass(frozen=True)
class BehaviorRule:
    """Events that count as one behaviour type, e.g. ``liked`` = ratings of at least 4.

    An event matches when its type is one of ``event_types`` (all types when empty) and its
    value lies in ``[min_value, max_value]`` (an open bound when None). Events without a
    value never match a rule with a bound.
    """

    name: str
    event_types: tuple[str, ...] = ()
    min_value: float | None = None
    max_value: float | None = None


@dataclass(frozen=True)
class InputSpec:
    """Which features the model reads besides the item sequences (all off: sequence only).

    - ``behaviors``: each rule adds a pooled sequence (the long history's items of that
      behaviour) to the user query token.
    - ``user_numeric`` / ``user_categorical``: ``user_features`` columns (as of the day
      before the prediction) added to the query token; numbers are log-scaled, categories
      hashed into ``categorical_buckets`` rows of an embedding table.
    - ``item_numeric``: ``item_features`` columns (same point in time) the Ranker reads
      for every candidate.
    - ``popularity_prior``: an ``item_features`` count column (e.g. ``pop_7d``, same point
      in time, encoded like ``item_numeric``) that the served score adds, times the
      model's ``prior_weight``, to each candidate's Ranker score (None: no prior).
    - ``time_gaps``: each short-history token also carries the time since the user's
      event before it (log-scaled buckets), so the Generator can tell a burst of ratings
      from a return after months.
    """

    behaviors: tuple[BehaviorRule, ...] = ()
    user_numeric: tuple[str, ...] = ()
    user_categorical: tuple[str, ...] = ()
    categorical_buckets: int = 1024
    item_numeric: tuple[str, ...] = ()
    popularity_prior: str | None = None
    time_gaps: bool = False

    def __post_init__(self) -> None:
        if len(self.behaviors) > TIME_SHIFT:
            raise ValueError(f"at most {TIME_SHIFT} behaviour rules fit an event code")

    @property
    def uses_event_codes(self) -> bool:
        """Whether the model reads per-event codes (:func:`event_codes`) beside the items."""
        return bool(self.behaviors) or self.time_gaps

    @property
    def uses_user_features(self) -> bool:
        return bool(self.user_numeric or self.user_categorical)

    @property
    def item_columns(self) -> tuple[str, ...]:
        """Every item column the model reads: the Ranker's, then the prior's (once)."""
        prior = self.popularity_prior
        extra = () if prior is None or prior in self.item_numeric else (prior,)
        return (*self.item_numeric, *extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "behaviors": [
                rule.__dict__ | {"event_types": list(rule.event_types)} for rule in self.behaviors
            ],
            "user_numeric": list(self.user_numeric),
            "user_categorical": list(self.user_categorical),
            "categorical_buckets": self.categorical_buckets,
            "item_numeric": list(self.item_numeric),
            "popularity_prior": self.popularity_prior,
            "time_gaps": self.time_gaps,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InputSpec:
        return cls(
            behaviors=tuple(
                BehaviorRule(**{**rule, "event_types": tuple(rule.get("event_types", ()))})
                for rule in values.get("behaviors", ())
            ),
            user_numeric=tuple(values.get("user_numeric", ())),
            user_categorical=tuple(values.get("user_categorical", ())),
            categorical_buckets=int(values.get("categorical_buckets", 1024)),
            item_numeric=tuple(values.get("item_numeric", ())),
            popularity_prior=values.get("popularity_prior"),
            time_gaps=bool(values.get("time_gaps", False)),
        )


FEATURE_GROUPS = ("behaviors", "user_profile", "item_features")


def select_groups(spec: InputSpec, groups: Sequence[str]) -> InputSpec:
    """``spec`` restricted to the feature ``groups`` a model uses (the others emptied).

    The settings define every group once (which events count as which behaviour, which
    profile and item columns); which groups a model reads is a separate choice, so an
    ablation switches groups without redefining them.
    """
    unknown = sorted(set(groups) - set(FEATURE_GROUPS))
    if unknown:
        raise ValueError(f"unknown feature groups {unknown}; known: {', '.join(FEATURE_GROUPS)}")
    return InputSpec(
        behaviors=spec.behaviors if "behaviors" in groups else (),
        user_numeric=spec.user_numeric if "user_profile" in groups else (),
        user_categorical=spec.user_categorical if "user_profile" in groups else (),
        categorical_buckets=spec.categorical_buckets,
        item_numeric=spec.item_numeric if "item_features" in groups else (),
        popularity_prior=spec.popularity_prior,
        time_gaps=spec.time_gaps,
    )


def behavior_flags(
    rules: Sequence[BehaviorRule], event_types: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """int64 bitmask per event: bit ``r`` set when the event matches ``rules[r]``.

    ``event_types`` are strings, ``values`` floats (NaN for events without a value).
    """
    kinds = np.asarray(event_types, dtype=object)
    numbers = np.asarray(values, dtype=np.float64)
    flags = np.zeros(len(kinds), dtype=np.int64)
    for bit, rule in enumerate(rules):
        match = np.isin(kinds, rule.event_types) if rule.event_types else np.ones(len(kinds), bool)
        if rule.min_value is not None or rule.max_value is not None:
            with np.errstate(invalid="ignore"):
                match &= np.isfinite(numbers)
                if rule.min_value is not None:
                    match &= numbers >= rule.min_value
                if rule.max_value is not None:
                    match &= numbers <= rule.max_value
        flags[match] |= 1 << bit
    return flags


def event_codes(
    spec: InputSpec, event_types: np.ndarray, values: np.ndarray, times_us: np.ndarray
) -> np.ndarray | None:
    """int64 code per event (see ``TIME_SHIFT``), or None for a model that reads none.

    ``times_us`` are unix microseconds, aligned with the other arrays. Training computes
    codes over whole timelines, serving over the online sequence; both then keep the
    same newest events, so each window holds the same numbers on both sides.
    """
    if not spec.uses_event_codes:
        return None
    codes = behavior_flags(spec.behaviors, event_types, values)
    if spec.time_gaps:
        seconds = np.asarray(times_us, dtype=np.int64) // US_PER_SECOND
        codes |= np.maximum(seconds, 0) << TIME_SHIFT
    return codes


def scale_numeric(values: np.ndarray) -> np.ndarray:
    """``sign(x)·log1p(|x|)`` as float32, missing (NaN) as 0: counts span 0..10^6."""
    values = np.asarray(values, dtype=np.float64)
    scaled = np.sign(values) * np.log1p(np.abs(values))
    return np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def hash_category(column: str, value: object, buckets: int) -> int:
    """A stable bucket in ``1..buckets-1`` for ``column=value`` (0 = missing).

    crc32, not Python's ``hash``: that one is salted per process, and training and serving
    are different processes.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0
    text = f"{column}={value}".encode()
    return 1 + zlib.crc32(text) % (buckets - 1)


def encode_categorical(
    columns: Sequence[str], rows: Sequence[Sequence[object]], buckets: int
) -> np.ndarray:
    """[N, len(columns)] bucket ids; ``rows[n][c]`` is the value of ``columns[c]`` for row n."""
    out = np.zeros((len(rows), len(columns)), dtype=np.int64)
    for n, row in enumerate(rows):
        for c, column in enumerate(columns):
            out[n, c] = hash_category(column, row[c], buckets)
    return out


def seen_items(history: np.ndarray, seen_len: int | None) -> np.ndarray:
    """The items never to recommend again: those of the last ``seen_len`` events (all: None).

    Serving applies it to the online sequence and evaluation to the history before each
    prediction, so the two filter exactly the same items.
    """
    recent = history if seen_len is None else history[len(history) - min(seen_len, len(history)) :]
    return np.unique(recent)


def standardize_items(table: np.ndarray) -> np.ndarray:
    """Each item feature column of one day as z-scores across the item rows (row 0, the
    padding row, stays 0).

    Popularity counts follow the whole site's traffic and ages grow with the calendar, so
    their raw scale drifts far outside what a model trained months earlier has seen. Their
    standing among the day's items (more popular than most, newer than most) does not.
    Training and serving both hold every item row of a day, so both compute the same.
    """
    out = np.zeros_like(table, dtype=np.float32)
    rows = table[1:].astype(np.float64)
    if len(rows):
        std = rows.std(axis=0)
        out[1:] = (rows - rows.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return out
