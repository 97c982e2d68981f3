"""docker-compose.yml validates with the placeholders of .env.example and commits no secret.

There is no Docker engine on CI machines; Debian's docker-compose (1.29) validates and
renders the file offline. Without the binary the tests skip locally and FAIL under CI.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grank.config import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
SECRETS = (
    "POSTGRES_PASSWORD",
    "AIRFLOW_DB_PASSWORD",
    "FEAST_DB_PASSWORD",
    "FEAST_READER_DB_PASSWORD",
    "REDIS_PASSWORD",
    "FEAST_READER_REDIS_PASSWORD",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
)
SERVICES = {
    "postgres",
    "redis",
    "spark-master",
    "spark-worker",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "feature-server",
    "serving",
}


def _compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: apt-get install -y docker-compose")
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    return binary


def _compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [_compose_binary(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_validates_with_env_example() -> None:
    done = _compose(ENV_EXAMPLE, "config", "-q")
    assert done.returncode == 0, done.stderr


def test_compose_declares_the_whole_stack_with_healthchecks() -> None:
    done = _compose(ENV_EXAMPLE, "config", "--services")
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == SERVICES
    rendered = _compose(ENV_EXAMPLE, "config").stdout
    # every long-running service has a healthcheck (airflow-init is a one-shot job)
    assert rendered.count("healthcheck:") == len(SERVICES) - 1


def test_no_secret_has_a_default(tmp_path: Path) -> None:
    """Leaving out any one secret makes validation fail and name it."""
    example = ENV_EXAMPLE.read_text().splitlines()
    for secret in SECRETS:
        assert f"{secret}=change-me" in example, secret
        env_file = tmp_path / f"{secret}.env"
        env_file.write_text("\n".join(line for line in example if not line.startswith(secret)))
        done = _compose(env_file, "config", "-q")
        assert done.returncode != 0, secret
        assert secret in done.stderr, done.stderr


def _executor_imports() -> set[str]:
    """Top-level third-party modules the executors import: those of the modules of
    ``features.spark.EXECUTOR_PACKAGES`` that ``features.feature_tables`` (the writer that
    ``mapInArrow`` runs) reaches, followed through our own imports."""
    from features.spark import EXECUTOR_PACKAGES

    ours = {package.__name__ for package in EXECUTOR_PACKAGES}
    seen: set[str] = set()
    third_party: set[str] = set()
    pending = ["features.feature_tables"]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = REPO_ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = REPO_ROOT / module.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in ours:
                    pending += [name, top]
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third_party.add(top)
    return third_party


def _dockerfile_stage(target: str) -> str:
    """The lines of one ``FROM ... AS target`` stage of docker/Dockerfile."""
    text = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    return next(s for s in stages if re.match(rf"\S+ AS {target}\b", s))


def test_spark_workers_run_an_image_that_provides_what_executors_import() -> None:
    """No Docker needed: the compose file and the Dockerfile say what the workers run."""
    import yaml

    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]
    grank_env = compose["x-grank-env"]
    driver = services["airflow-scheduler"]  # LocalExecutor: the tasks (the driver) run here
    for name in ("spark-master", "spark-worker"):
        service = services[name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
        assert service["entrypoint"] == ["/opt/spark/bin/spark-class"], name
    worker = services["spark-worker"]
    stage = _dockerfile_stage(worker["build"]["target"])
    # the stage installs the locked app environment and makes /opt/spark its pyspark
    assert "-r requirements/app.in -c requirements/app.lock" in stage
    assert "python -m venv /opt/grank/venv" in stage
    assert re.search(r"ln -s .*pyspark.* /opt/spark", stage)
    # the executors' Python is that environment, and it holds every executor import
    assert grank_env["GRANK_SPARK__EXECUTOR_PYTHON"] == "/opt/grank/venv/bin/python"
    locked = {
        line.split("==")[0].lower()
        for line in (REPO_ROOT / "requirements" / "app.lock").read_text().splitlines()
        if "==" in line
    }
    distributions = importlib.metadata.packages_distributions()
    imports = _executor_imports()
    assert {"pyarrow", "numpy"} <= imports
    for module in imports:
        assert any(d.lower() in locked for d in distributions[module]), module
    # the driver advertises its service name; data root at the same path everywhere
    assert driver["environment"]["GRANK_SPARK__DRIVER_HOST"] == "airflow-scheduler"
    assert grank_env["GRANK_SPARK__MASTER"] == "spark://spark-master:7077"
    for service in (worker, driver):
        assert "grank-data:/data" in service["volumes"]
    assert grank_env["GRANK_DATA_ROOT"] == "/data"
