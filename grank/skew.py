"""Online/offline skew check: serving must feed the model what training fed it.

For a day D and a sample of users, two paths build the model's inputs for a prediction
made on D+1:

- online, as serving does it: the Feast online store (after ``materialize --date D``),
  through the serving source and the serving encoder (serving/encoding.py);
- offline, as training does it: the feature tables, point in time (training_examples up
  to the end of D; user_features/item_features of D), through the training readers.

Every tensor must be equal: sequences, event codes (behaviours and times), profile
features, and the item features of a sample of items. A difference means the model serves
on inputs it was not trained on (a column materialized from the wrong day, an encoding
that drifted, ...). This module sits at the edge because it is the one place that reads both paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import torch

from serving.encoding import encode_users, item_feature_table, user_columns
from serving.sequences import FeastUserSource
from training.data import Queries, day_number, query_histories, read_timelines
from training.features import read_feature_history
from training.inputs import event_codes
from training.model import GRankConfig


@dataclass(frozen=True)
class SkewReport:
    """What was compared and every difference found (empty: no skew)."""

    day: date
    users: int
    items: int
    mismatches: list[str]


def check_skew(
    features_dir: Path,
    feast_dir: Path,
    config: GRankConfig,
    day: date,
    n_users: int,
    n_items: int,
    ttl_days: int,
    seed: int = 0,
) -> SkewReport:
    """Compare the online and offline inputs of ``n_users`` users active up to ``day``."""
    timelines = read_timelines(features_dir, None, day)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(timelines.n_users, min(n_users, timelines.n_users), replace=False))
    user_ids = timelines.user_ids[rows]
    lengths = np.diff(timelines.offsets)[rows]
    tomorrow = day + timedelta(days=1)
    days = np.full(len(rows), day_number(tomorrow))
    # a prediction on D+1 with every event up to the end of D as its history
    queries = Queries(rows, lengths, np.zeros(len(rows) + 1, np.int64), np.zeros(0, np.int64), days)
    spec = config.inputs
    codes = event_codes(spec, timelines.event_types(), timelines.event_values(), timelines.times)
    short, long, long_codes = query_histories(
        timelines, queries, config.short_seq_len, config.long_seq_len, codes
    )
    history = read_feature_history(
        features_dir, spec, tomorrow, tomorrow, config.n_item_rows, ttl_days, torch.device("cpu")
    )
    offline = history.user_context(long, long_codes, user_ids, days, torch.device("cpu"))

    source = FeastUserSource(feast_dir)
    online_histories = source.get([int(u) for u in user_ids], user_columns(config))
    mismatches = [
        f"user {u}: unknown to the online store" for u, h in online_histories.items() if h is None
    ]
    known = [h for h in online_histories.values() if h is not None]
    if len(known) == len(user_ids):
        online_short, online = encode_users(config, known)
        pairs = {
            "short sequence": (online_short.numpy(), short),
            "long sequence": (
                online.long_seq.numpy() if online.long_seq is not None else None,
                long,
            ),
            "event codes": (_np(online.long_codes), long_codes),
            "user numeric features": (_np(online.numeric), _np(offline.numeric)),
            "user categorical features": (_np(online.categorical), _np(offline.categorical)),
        }
        for name, (served, trained) in pairs.items():
            mismatches += _compare(name, served, trained, user_ids)
    items = np.sort(
        rng.choice(
            np.arange(1, config.n_item_rows), min(n_items, config.n_item_rows - 1), replace=False
        )
    )
    if spec.item_columns:
        item_served = item_feature_table(config, source)[items].numpy()
        item_trained = history.item_features(days[:1], torch.as_tensor(items)[None, :])
        assert item_trained is not None
        mismatches += _compare("item features", item_served, item_trained[0].numpy(), items)
    return SkewReport(day, len(user_ids), len(items), mismatches)


def _np(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()


def _compare(
    name: str, served: np.ndarray | None, trained: np.ndarray | None, keys: np.ndarray
) -> list[str]:
    """One line per entity whose ``name`` differs between serving and training."""
    if served is None and trained is None:
        return []
    if served is None or trained is None or served.shape != trained.shape:
        return [
            f"{name}: shapes differ (served {None if served is None else served.shape},"
            f" trained {None if trained is None else trained.shape})"
        ]
    differ = ~np.isclose(served, trained, rtol=0, atol=1e-6).reshape(len(keys), -1).all(axis=1)
    return [
        f"{name} of {int(key)}: served {served[i].tolist()} != trained {trained[i].tolist()}"
        for i, key in zip(np.flatnonzero(differ), keys[differ], strict=True)
    ]
