"""The model's inputs from the online store, encoded exactly as training encodes them.

Users' sequences and profiles are encoded per request batch (the Recommender), the item
features a Ranker reads once per snapshot load (the bundle's reader). Both call the
encodings of training/inputs.py, the one definition both sides share, and the skew check
(grank/skew.py) compares what these functions produce with what training reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from serving.sequences import ItemSource, UserHistory
from training.inputs import encode_categorical, event_codes, scale_numeric, standardize_items
from training.model import GRankConfig, UserContext


def user_columns(config: GRankConfig) -> tuple[str, ...]:
    """The profile columns a model reads from the online store."""
    return (*config.inputs.user_numeric, *config.inputs.user_categorical)


def encode_users(
    config: GRankConfig, histories: Sequence[UserHistory]
) -> tuple[torch.Tensor, UserContext]:
    """The Generator's inputs for these users, encoded exactly as training encodes them.

    Sequences are left-padded to the model's lengths; event codes come from the long
    sequence's event types, values and times; profile columns are scaled or hashed
    (training/inputs.py, the one definition both sides share).
    """
    spec = config.inputs
    short = _left_pad([h.short for h in histories], config.short_seq_len)
    long = _left_pad([h.long for h in histories], config.long_seq_len)
    codes = None
    if spec.uses_event_codes:
        rows: list[np.ndarray] = []
        for h in histories:
            kinds = np.array(h.event_types or [""] * len(h.long), dtype=object)
            values = np.array(h.values or [np.nan] * len(h.long), dtype=np.float64)
            times = np.array(h.times or [0] * len(h.long), dtype=np.int64)
            event = event_codes(spec, kinds, values, times)
            assert event is not None  # the spec reads codes
            rows.append(event)
        codes = _left_pad(rows, config.long_seq_len)
    numeric = categorical = None
    if spec.user_numeric:
        raw = np.array([[_number(h.features.get(c)) for c in spec.user_numeric] for h in histories])
        numeric = torch.from_numpy(scale_numeric(raw).reshape(len(histories), -1))
    if spec.user_categorical:
        categorical = torch.from_numpy(
            encode_categorical(
                spec.user_categorical,
                [[h.features.get(c) for c in spec.user_categorical] for h in histories],
                spec.categorical_buckets,
            )
        )
    return short, UserContext(long, codes, numeric, categorical)


def item_feature_table(config: GRankConfig, items: ItemSource) -> torch.Tensor:
    """[table rows, Fi]: every item row's features from the store, encoded as training does
    (scaled, then standardized across the day's items)."""
    columns = config.inputs.item_columns
    rows = np.arange(1, config.n_item_rows, dtype=np.int64)
    table = np.zeros((config.n_item_rows, len(columns)), dtype=np.float32)
    table[1:] = encode_items(items, columns, rows)
    return torch.from_numpy(standardize_items(table))


def encode_items(items: ItemSource, columns: Sequence[str], item_ids: np.ndarray) -> np.ndarray:
    """[len(item_ids), len(columns)] item features from the store, scaled as training does."""
    values = items.item_features(item_ids, columns)
    raw = np.array(
        [[np.nan if v is None else float(v) for v in values[column]] for column in columns]
    )
    return scale_numeric(raw.T.reshape(len(item_ids), len(columns)))


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _left_pad(
    sequences: Sequence[Sequence[int]] | Sequence[np.ndarray], length: int
) -> torch.Tensor:
    """[B, length] LongTensor of the newest ``length`` ids of each sequence, left-padded with 0."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for b, seq in enumerate(sequences):
        tail = list(seq)[-length:]
        if tail:
            out[b, length - len(tail) :] = tail
    return torch.from_numpy(out)
