"""One place that builds the SparkSession, so every job and test gets the same settings."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def get_session(
    master: str = "local[*]", shuffle_partitions: int = 8, driver_memory: str = "4g"
) -> SparkSession:
    """Return the process' SparkSession, creating it with UTC time and microsecond Parquet.

    UTC session time zone: day boundaries and timestamps must not depend on the host's
    zone. ``TIMESTAMP_MICROS``: Feast, pyarrow and Spark all read microsecond Parquet
    timestamps, while nanoseconds break Spark 4 (pitfalls.md).
    """
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master(master)
        .appName("grank-features")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.driver.memory", driver_memory)
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
