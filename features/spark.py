"""One place that builds the SparkSession, so every job and test gets the same settings."""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import common
import features
from common.processes import stop_process_group
from features.config import SparkConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LISTING_TASKS = 8
# what the executors import of ours: ``features.feature_tables`` (the pyarrow writer that
# ``mapInArrow`` runs) and what it imports, i.e. these two packages
EXECUTOR_PACKAGES = (features, common)


def get_session(config: SparkConfig) -> SparkSession:
    """Return the process' SparkSession, creating it with UTC time.

    UTC session time zone: day boundaries and timestamps must not depend on the host's
    zone. Spark itself writes no Parquet: ``features.feature_tables`` writes with pyarrow
    in Python workers on the executors. Those run ``config.executor_python`` (default: this
    interpreter's path, right for ``local[*]`` and for workers whose app environment sits
    at the same path); it needs pyarrow and numpy, not this package: the session ships
    our code to every executor (:func:`ship_packages`), so executors always run the
    driver's version of it. ``config.driver_host`` is the address executors reach the driver
    at: loopback for ``local[*]`` and for a cluster on this machine, the host or service
    name when workers run elsewhere (the driver binds it too).

    Listing the raw day folders of a rebuild (one per day, 1,040 for ML-1M) runs as a
    Spark job of ``LISTING_TASKS`` tasks instead of one task per folder, whose overhead
    was ~6 s on two cores.
    """
    os.environ.setdefault("SPARK_LOCAL_IP", config.driver_host)
    if config.executor_python:
        os.environ["PYSPARK_PYTHON"] = config.executor_python
    else:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master(config.master)
        .appName("grank-features")
        .config("spark.driver.host", config.driver_host)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(config.shuffle_partitions))
        .config("spark.driver.memory", config.driver_memory)
        .config("spark.executor.memory", config.executor_memory)
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_log(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{log}: no {text!r} within {timeout:g}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def standalone_cluster(
    folder: Path,
    cores: int = 2,
    memory: str = "2g",
    worker_env: dict[str, str] | None = None,
    **worker_process: Any,
) -> Iterator[str]:
    """A standalone Spark master and one worker on loopback for the block; yields its URL.

    Both are separate processes started with the launch classes of the pyspark
    distribution (``bin/spark-class``), i.e. the same Spark as the driver's; this is what
    the cluster test and the scale benchmark run against. Logs and the worker's work
    directory go under ``folder``. ``worker_env`` is the worker's whole environment
    (default: this process'); ``worker_process`` goes to its ``Popen`` (``user=``,
    ``group=``: the worker as another OS user). Both are stopped afterwards.
    """
    import pyspark

    home = Path(pyspark.__file__).parent
    spark_class = str(home / "bin" / "spark-class")
    daemons = {
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_DAEMON_MEMORY": "512m",
    }
    work = folder / "worker-work"
    work.mkdir(parents=True, exist_ok=True)
    if "user" in worker_process:
        os.chown(work, worker_process["user"], worker_process.get("group", -1))
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        master_log = folder / "master.log"
        with open(master_log, "wb") as out:
            processes.append(
                subprocess.Popen(
                    [
                        *(spark_class, "org.apache.spark.deploy.master.Master"),
                        *("--host", "127.0.0.1", "--port", str(port)),
                        *("--webui-port", str(_free_port())),
                    ],
                    env={**os.environ, **daemons},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        worker_log = folder / "worker.log"
        with open(worker_log, "wb") as out:
            processes.append(
                subprocess.Popen(
                    [
                        *(spark_class, "org.apache.spark.deploy.worker.Worker", url),
                        *("--host", "127.0.0.1", "--cores", str(cores), "--memory", memory),
                        *("--work-dir", str(work), "--webui-port", str(_free_port())),
                    ],
                    env={
                        **(os.environ if worker_env is None else worker_env),
                        **daemons,
                        "HOME": str(work),
                        "SPARK_LOCAL_DIRS": str(work),
                    },
                    cwd=work,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **worker_process,
                )
            )
        _wait_for_log(master_log, "I have been elected leader", processes[0], 120)
        _wait_for_log(worker_log, "Successfully registered with master", processes[1], 120)
        yield url
    finally:
        for process in reversed(processes):
            stop_process_group(process, grace_seconds=20)
