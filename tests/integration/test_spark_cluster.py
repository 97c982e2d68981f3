"""The feature build on a real standalone Spark cluster, with what differs between hosts.

A Spark master and one worker run as separate processes, started with the launch classes
of the pyspark distribution (``bin/spark-class``), bound to loopback. The worker runs as
its own OS user, in its own work directory, with its own Python environment (another
interpreter whose environment holds the app's libraries but not our package): what a
worker on another machine looks like to the job, except for the network. The driver is
``grank features build`` with ``GRANK_SPARK__MASTER=spark://...``; its partitions must
be byte-identical to the same days built by ``local[*]``.

Needs root (to create the worker's user and start the worker as that user); skipped
with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from features import feature_tables as ft
from features.spark import standalone_cluster
from grank.cli.features_etl import build_spec
from grank.config import Settings
from tests.conftest import make_settings
from tests.e2e.test_dag_e2e import tree_digest
from tests.integration.test_features_jobs import copy_lake_days

WORKER_USER = "grankworker"
# history from FIRST_DAY; BOOTSTRAP is built from it (no state yet), NEXT incrementally
FIRST_DAY, BOOTSTRAP, NEXT = date(1998, 3, 25), date(1998, 3, 26), date(1998, 3, 27)
SHUFFLE_PARTITIONS = 4  # the session fixture's


@dataclass
class Cluster:
    """A running standalone master + worker, and what the driver needs to use them."""

    master_url: str
    base: Path  # group-shared folder (the data roots live here)
    worker_uid: int
    worker_python: Path


def _ensure_user() -> tuple[bool, pwd.struct_passwd]:
    """The worker's OS user, created if missing; True if this call created it."""
    if os.geteuid() != 0:
        pytest.skip(
            f"the Spark cluster test needs root: it creates the OS user {WORKER_USER!r} and"
            " runs the Spark worker as that user (NOT RUN)"
        )
    with contextlib.suppress(KeyError):
        return False, pwd.getpwnam(WORKER_USER)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", WORKER_USER],
        check=True,
    )
    return True, pwd.getpwnam(WORKER_USER)


def as_worker() -> dict[str, Any]:
    """Popen arguments that run a process as the worker's user and group only (``user=``
    alone keeps root's groups)."""
    user = pwd.getpwnam(WORKER_USER)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _worker_environment(target: Path) -> Path:
    """A Python environment of the worker's own: another interpreter of this version whose
    path holds the app's third-party libraries but not our package (which the job ships).

    The app environment's interpreter may sit where the worker's user cannot read (a
    root-only home); the first interpreter the worker's user can run is used.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        Path(getattr(sys, "_base_executable", sys.executable)),
        Path(f"/usr/bin/python{version}"),
        Path(f"/usr/local/bin/python{version}"),
    ]
    for interpreter in candidates:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            subprocess.run([str(interpreter), "-c", ""], **as_worker(), check=True)
            break
    else:
        pytest.skip(f"no Python {version} the user {WORKER_USER!r} can run (NOT RUN)")
    subprocess.run([str(interpreter), "-m", "venv", "--without-pip", str(target)], check=True)
    site = target / "lib" / f"python{version}" / "site-packages"
    # a path added by a .pth file is not a site dir: the app env's own .pth files (the
    # editable install of grank) are not processed, so our package stays absent
    (site / "app-libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return target / "bin" / "python"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    created, user = _ensure_user()
    # a group-shared folder (setgid: everything below keeps the worker's group), the way
    # a driver and workers under different users share a data root
    base = Path(tempfile.mkdtemp(prefix="grank-cluster-"))
    try:
        os.chown(base, 0, user.pw_gid)
        base.chmod(0o2775)
        worker_python = _worker_environment(base / "worker-env")
        # nothing of the driver's Python path reaches the worker (the checkout may be on it)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        probe = subprocess.run(
            [str(worker_python), "-c", "import pyarrow, numpy, pyspark\nimport features"],
            **as_worker(),
            cwd=base,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert "No module named 'features'" in probe.stderr, probe.stderr
        with standalone_cluster(base, cores=2, memory="2g", worker_env=env, **as_worker()) as url:
            yield Cluster(url, base, user.pw_uid, worker_python)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if created:
            subprocess.run(["userdel", WORKER_USER], check=False)


def test_features_build_on_a_standalone_cluster_equals_local(
    cluster: Cluster, spark, ml100k_settings: Settings
) -> None:
    on_cluster = make_settings(cluster.base / "cluster")
    local = make_settings(cluster.base / "local")
    for settings in (on_cluster, local):
        copy_lake_days(ml100k_settings.lake_dir, settings.lake_dir, FIRST_DAY, NEXT)

    env = {k: v for k, v in os.environ.items() if not k.startswith("GRANK_")}
    env.update(
        GRANK_DATA_ROOT=str(on_cluster.data_root),
        GRANK_DATASET="ml-100k",
        GRANK_SPARK__MASTER=cluster.master_url,
        GRANK_SPARK__EXECUTOR_PYTHON=str(cluster.worker_python),
        GRANK_SPARK__DRIVER_MEMORY="1g",
        GRANK_SPARK__EXECUTOR_MEMORY="1g",
        GRANK_SPARK__SHUFFLE_PARTITIONS=str(SHUFFLE_PARTITIONS),
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "grank", "features", "build"),
            *("--from", BOOTSTRAP.isoformat(), "--to", NEXT.isoformat()),
        ],
        env=env,
        umask=0o002,  # the driver's folders stay writable for the workers' group
        capture_output=True,
        text=True,
        timeout=900,  # generous: CI machines are shared
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    assert f"{BOOTSTRAP}: rebuild" in done.stdout and f"{NEXT}: incremental" in done.stdout

    from features.jobs import build

    spec = build_spec(local)  # what the CLI builds, run by the local session
    for day in (BOOTSTRAP, NEXT):
        build(spark, spec, day)

    built = tree_digest(on_cluster.features_dir)
    assert built and built == tree_digest(local.features_dir)
    # the executors (the worker's user) wrote the partitions; no staging folder is left
    part = ft.partition_path(ft.table_dir(on_cluster.features_dir, ft.TRAINING_EXAMPLES), NEXT)
    assert (part / ft.PART_FILE).stat().st_uid == cluster.worker_uid
    assert not [p for p in on_cluster.features_dir.rglob(".*")]
