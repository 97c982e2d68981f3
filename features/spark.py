"""One place that builds the SparkSession, so every job and test gets the same settings."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import weakref
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import common
import features

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LISTING_TASKS = 8
# what the executors import of ours: ``features.feature_tables`` (the pyarrow writer that
# ``mapInArrow`` runs) and what it imports, i.e. these two packages
EXECUTOR_PACKAGES = (features, common)


def get_session(
    master: str = "local[*]",
    shuffle_partitions: int = 8,
    driver_memory: str = "4g",
    driver_host: str = "127.0.0.1",
    executor_python: str = "",
    executor_memory: str = "4g",
) -> SparkSession:
    """Return the process' SparkSession, creating it with UTC time.

    UTC session time zone: day boundaries and timestamps must not depend on the host's
    zone. Spark itself writes no Parquet: ``features.feature_tables`` writes with pyarrow
    in Python workers on the executors. Those run ``executor_python`` (default: this
    interpreter's path, right for ``local[*]`` and for workers whose app environment sits
    at the same path); it needs pyarrow and numpy, not this package: the session ships
    our code to every executor (:func:`ship_packages`), so executors always run the
    driver's version of it. ``driver_host`` is the address executors reach the driver
    at: loopback for ``local[*]`` and for a cluster on this machine, the host or service
    name when workers run elsewhere (the driver binds it too).

    Listing the raw day folders of a rebuild (one per day, 1,040 for ML-1M) runs as a
    Spark job of ``LISTING_TASKS`` tasks instead of one task per folder, whose overhead
    was ~6 s on two cores.
    """
    os.environ.setdefault("SPARK_LOCAL_IP", driver_host)
    if executor_python:
        os.environ["PYSPARK_PYTHON"] = executor_python
    else:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master(master)
        .appName("grank-features")
        .config("spark.driver.host", driver_host)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.driver.memory", driver_memory)
        .config("spark.executor.memory", executor_memory)
        .config("spark.sql.sources.parallelPartitionDiscovery.parallelism", str(LISTING_TASKS))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    ship_packages(session)
    return session


_shipped: weakref.WeakSet[object] = weakref.WeakSet()


def ship_packages(session: SparkSession) -> None:
    """Send our executor-side packages to every executor as one zip (once per context).

    Why ship rather than require the package installed on the workers: a worker image
    then only needs the third-party libraries (pyarrow, numpy), and a worker can never
    run another version of our writer than the driver's, which would break the
    byte-identical partitions silently. The zip is put ahead of the worker's
    site-packages on its Python path.
    """
    context = session.sparkContext
    if context in _shipped:
        return
    handle, name = tempfile.mkstemp(prefix="grank-executor-", suffix=".zip")
    os.close(handle)
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED) as archive:
        for package in EXECUTOR_PACKAGES:
            root = Path(package.__file__).parent  # type: ignore[arg-type]
            for source in sorted(root.rglob("*.py")):
                archive.write(source, source.relative_to(root.parent))
    context.addPyFile(name)
    _shipped.add(context)
