"""Shared fixtures: the real datasets (cached under data/), an ML-100K lake, one Spark session.

The datasets are fetched once into the repository's git-ignored ``data/`` cache (the
test command runs ``grank data fetch`` first); every test writes into its own tmp root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import pytest

from features import lake
from features.datasets import fetch, load_events
from grank.config import REPO_ROOT, Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

CACHE_ROOT = REPO_ROOT / "data"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """Converted ML-1M and ML-100K (downloaded and verified once, then cached)."""
    settings = Settings(data_root=CACHE_ROOT)
    for name in ("ml-100k", "ml-1m"):
        fetch(name, settings.downloads_dir, settings.datasets_dir)
    return settings.datasets_dir


def make_settings(root: Path, **overrides: object) -> Settings:
    """Settings rooted in a test's own folder (ML-100K unless told otherwise)."""
    values: dict[str, object] = {"data_root": root, "dataset": "ml-100k"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def land_dataset(
    settings: Settings, datasets_dir: Path, first: object = None, last: object = None
) -> lake.LandingReport:
    """Land (part of) a converted dataset into ``settings``' lake, like ``grank data land``."""
    events = lake.to_lake_events(load_events(settings.dataset, datasets_dir))
    lo, hi = lake.dataset_day_range(events)
    lake.claim_lake(settings.lake_dir, settings.dataset)
    report = lake.land_days(
        settings.lake_dir,
        events,
        first or lo,
        last or hi,  # type: ignore[arg-type]
        require_events=False,
    )
    folder = datasets_dir / settings.dataset
    lake.land_dimensions(
        settings.lake_dir,
        pq.read_table(folder / "items.parquet"),
        pq.read_table(folder / "users.parquet"),
    )
    return report


@pytest.fixture(scope="session")
def ml100k_settings(tmp_path_factory: pytest.TempPathFactory, datasets_dir: Path) -> Settings:
    """A data root whose lake holds all of ML-100K (read-only for tests: copy before changing)."""
    settings = make_settings(tmp_path_factory.mktemp("ml100k"))
    land_dataset(settings, datasets_dir)
    return settings


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    """One local Spark session for the whole test run (starting one costs ~5 s)."""
    from features.config import SparkConfig
    from features.spark import get_session

    session = get_session(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="2g"))
    yield session
    session.stop()


# the ML-100K days the training tests train on (11 days, ~12k events)
TRAINING_FIRST, TRAINING_LAST = date(1998, 3, 25), date(1998, 4, 4)


@pytest.fixture(scope="session")
def ml100k_training_root(
    spark: SparkSession, ml100k_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A data root with ML-100K 1998-03-25..04-04 landed and its features built by the real
    Spark job (read-only: link its folders into a test's own root)."""
    from features.jobs import BuildSpec, build_day

    settings = make_settings(tmp_path_factory.mktemp("training_root"))
    source = ml100k_settings.lake_dir
    for day in lake.landed_days(source):
        if TRAINING_FIRST <= day <= TRAINING_LAST:
            shutil.copytree(
                lake.partition_dir(source, day), lake.partition_dir(settings.lake_dir, day)
            )
    for name in ("items", "users"):
        shutil.copytree(source / "raw" / name, settings.lake_dir / "raw" / name)
    spec = BuildSpec(settings.lake_dir, settings.features_dir, settings.quarantine_dir)
    build_day(spark, spec, TRAINING_LAST, rebuild=True)
    return settings.data_root
