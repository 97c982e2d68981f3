"""Feast objects over the Spark feature tables (docs/architecture.md, Contracts 2 and 3).

Every field carries an explicit dtype: Feast's inference of list types has a history of
bugs, and the feature services below are versioned contracts with other teams, so a
schema change must be a visible diff here, never an inference side effect.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from features.config import (
    ACTIVITY,
    POPULARITY,
    BuildConfig,
    count_columns,
    item_context_columns,
    user_profile_columns,
)
from features.feature_tables import FeatureTables

if TYPE_CHECKING:
    from feast import FileSource
    from feast.feast_object import FeastObject

USER_SEQUENCES = "user_behavior_sequences"
USER_FEATURES = "user_features"
ITEM_FEATURES = "item_features"

# The views written to the online store by `grank features materialize`, in write order.
ONLINE_VIEWS: tuple[str, ...] = (USER_SEQUENCES, USER_FEATURES, ITEM_FEATURES)

# Attribute columns of the dimensions (name -> type of the dataset config), in table order;
# the dataset config declares them (features/dataset_config.py), these are MovieLens'.
Attributes = dict[str, str]
USER_ATTRIBUTES: Attributes = {"age": "int32", "gender": "string", "occupation": "string"}
ITEM_ATTRIBUTES: Attributes = {"title": "string", "year": "int32", "genres": "string"}


def feature_services(
    user_attributes: Attributes = USER_ATTRIBUTES,
    windows_days: tuple[int, ...] = BuildConfig.windows_days,
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Feature service name -> {feature view: fields}, with the dataset's user attributes
    and the count columns of the configured windows.

    The names are the consumers' contracts: a breaking change gets a new version
    (``_v2``) next to the old one, never an edit.
    """
    profile = (*user_profile_columns(windows_days), *user_attributes)
    return {
        "grank_generator_v1": {USER_SEQUENCES: ("short_item_seq", "seq_len")},
        "grank_ranker_v1": {USER_SEQUENCES: ("item_seq", "ts_seq")},
        # what a model trained with features reads besides the sequences (docs/model.md)
        "grank_user_context_v1": {
            USER_SEQUENCES: ("item_seq", "event_type_seq", "value_seq"),
            USER_FEATURES: profile,
        },
        "grank_item_context_v1": {
            ITEM_FEATURES: item_context_columns(windows_days),
        },
        "user_profile_v1": {
            USER_FEATURES: profile,
            USER_SEQUENCES: ("seq_len", "last_event_ts", "short_item_seq"),
        },
    }


FEATURE_SERVICES = feature_services()

# Sequences are the user's whole state, true until the next event however old it is:
# timedelta(0) means "never expires" to Feast. Daily aggregates (1d/7d/30d counts) are
# rewritten for every day; a value older than two days is wrong rather than stale (the
# counts would have moved), so point-in-time retrieval returns null after one missed run.
SEQUENCE_TTL = timedelta(0)
DAILY_TTL = timedelta(days=2)


def _source(features_dir: Path, table: str) -> FileSource:
    """One Parquet source per table folder; Feast reads every ``dt=`` partition under it."""
    from feast import FileSource

    return FileSource(
        name=table,
        path=str(FeatureTables(features_dir).table_dir(table)),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
        description=f"Spark feature table {table} (features/<table>/dt=YYYY-MM-DD/)",
    )


def build_definitions(
    features_dir: Path,
    user_attributes: Attributes = USER_ATTRIBUTES,
    item_attributes: Attributes = ITEM_ATTRIBUTES,
    windows_days: tuple[int, ...] = BuildConfig.windows_days,
) -> list[FeastObject]:
    """All Feast objects of the project, reading the tables under ``features_dir``; the
    dimension attribute columns are the dataset's, the count columns those of its windows."""
    from feast import Entity, FeatureService, FeatureView, Field, ValueType
    from feast.types import Array, Bool, Float32, Float64, Int32, Int64, String, UnixTimestamp

    dtypes = {
        "string": String,
        "int32": Int32,
        "int64": Int64,
        "float32": Float32,
        "float64": Float64,
        "bool": Bool,
    }

    user = Entity(
        name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A user"
    )
    item = Entity(
        name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="An item"
    )
    sources = {table: _source(features_dir, table) for table in ONLINE_VIEWS}
    views = {
        USER_SEQUENCES: FeatureView(
            name=USER_SEQUENCES,
            entities=[user],
            ttl=SEQUENCE_TTL,
            source=sources[USER_SEQUENCES],
            schema=[
                Field(name="user_id", dtype=Int64),
                Field(name="item_seq", dtype=Array(Int64), description="<=200 items, old->new"),
                Field(name="ts_seq", dtype=Array(Int64), description="unix us, aligned"),
                Field(name="event_type_seq", dtype=Array(String)),
                Field(name="value_seq", dtype=Array(Float32)),
                Field(name="short_item_seq", dtype=Array(Int64), description="last <=64 items"),
                Field(name="seq_len", dtype=Int64),
                Field(name="last_event_ts", dtype=UnixTimestamp),
            ],
            online=True,
            description="Behaviour sequence of each user as of its last event",
        ),
        USER_FEATURES: FeatureView(
            name=USER_FEATURES,
            entities=[user],
            ttl=DAILY_TTL,
            source=sources[USER_FEATURES],
            schema=[
                Field(name="user_id", dtype=Int64),
                *(Field(name=n, dtype=Int64) for n in count_columns(ACTIVITY, windows_days)),
                Field(name="mean_value", dtype=Float32),
                Field(name="first_seen_ts", dtype=UnixTimestamp),
                Field(name="tenure_days", dtype=Int64),
                *(Field(name=n, dtype=dtypes[t]) for n, t in user_attributes.items()),
            ],
            online=True,
            description="Daily activity counts and demographics of each user",
        ),
        ITEM_FEATURES: FeatureView(
            name=ITEM_FEATURES,
            entities=[item],
            ttl=DAILY_TTL,
            source=sources[ITEM_FEATURES],
            schema=[
                Field(name="item_id", dtype=Int64),
                *(Field(name=n, dtype=Int64) for n in count_columns(POPULARITY, windows_days)),
                Field(name="first_seen_ts", dtype=UnixTimestamp),
                Field(name="age_days", dtype=Int64, description="days since first seen"),
                *(Field(name=n, dtype=dtypes[t]) for n, t in item_attributes.items()),
            ],
            online=True,
            description="Daily popularity and metadata of each item",
        ),
    }
    services = [
        FeatureService(
            name=name,
            features=[views[view][list(fields)] for view, fields in members.items()],
            description=f"Versioned feature contract {name}",
        )
        for name, members in feature_services(user_attributes, windows_days).items()
    ]
    return [user, item, *sources.values(), *views.values(), *services]
