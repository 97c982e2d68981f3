"""The dataset config of the configured lake, turned into the plain values each layer takes.

``grank data ingest`` keeps the config it landed with beside the lake; every later step
(quality gates, feature build, Feast, training, serving) reads it through here, so the
columns, event types and attributes of a team's export reach every layer from one file.
Lakes landed without a stored config (synthetic data, older replays) use the shipped
config of ``Settings.dataset``.
"""

from __future__ import annotations

from dataclasses import replace

from features.dataset_config import DatasetConfig, for_lake
from grank.config import Settings
from training.inputs import BehaviorRule, InputSpec

SPARK_TYPES = {
    "string": "STRING",
    "int32": "INT",
    "int64": "BIGINT",
    "float32": "FLOAT",
    "float64": "DOUBLE",
    "bool": "BOOLEAN",
}


def lake_config(settings: Settings) -> DatasetConfig:
    """The config the lake was ingested with (or the shipped one of ``Settings.dataset``)."""
    return for_lake(settings.lake_dir, settings.dataset)


def spark_attributes(attributes: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Attribute columns as (name, Spark type) pairs for the feature job."""
    return tuple((name, SPARK_TYPES[kind]) for name, kind in attributes.items())


def model_inputs(settings: Settings, config: DatasetConfig) -> InputSpec:
    """The model's feature groups with the dataset's behaviours and user attributes, and
    its popularity prior's column.

    Which numeric features exist is fixed by the feature job; which behaviours and
    categorical user attributes exist depends on the data, so those come from the config.
    """
    return replace(
        settings.train.inputs,
        behaviors=tuple(
            BehaviorRule(b.name, b.event_types, b.min_value, b.max_value) for b in config.behaviors
        ),
        user_categorical=tuple(config.user_attributes),
        popularity_prior=(
            settings.train.recent_popularity_column if settings.train.popularity_prior else None
        ),
        time_gaps=settings.train.time_gaps,
    )
