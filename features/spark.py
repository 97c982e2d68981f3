"""One place that builds the SparkSession, so every job and test gets the same settings."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LISTING_TASKS = 8


def get_session(
    master: str = "local[*]", shuffle_partitions: int = 8, driver_memory: str = "4g"
) -> SparkSession:
    """Return the process' SparkSession, creating it with UTC time.

    UTC session time zone: day boundaries and timestamps must not depend on the host's
    zone. Spark itself writes no Parquet: ``features.feature_tables`` writes with pyarrow
    in Python workers, which run this interpreter unless ``PYSPARK_PYTHON`` says
    otherwise (Spark's default, ``python3`` on the PATH, may lack pyarrow and this
    package). Listing the raw day folders of a rebuild (one per day, 1,040 for ML-1M)
    runs as a Spark job of ``LISTING_TASKS`` tasks instead of one task per folder, whose
    overhead was ~6 s on two cores.
    """
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master(master)
        .appName("grank-features")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.driver.memory", driver_memory)
        .config("spark.sql.sources.parallelPartitionDiscovery.parallelism", str(LISTING_TASKS))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
