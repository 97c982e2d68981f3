"""scripts/setup.sh builds the two environments side by side; a failure in either must
still fail the script, or `make run` would go on with a half-built Airflow environment.

Runs the real script on a copy of the requirement files: the app environment is
already current (its stamp matches), the Airflow one asks for a package that does not
exist, so pip fails inside the background install.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from grank.config import REPO_ROOT

APP_INPUTS = ("requirements/app.in", "requirements/app.lock", "pyproject.toml")


def _copy(paths: tuple[str, ...], root: Path) -> None:
    for relative in paths:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / relative, root / relative)


def test_a_failed_airflow_install_fails_setup_and_leaves_no_stamp(tmp_path: Path) -> None:
    _copy(("scripts/setup.sh", *APP_INPUTS), tmp_path)
    # the app environment is current: a stamp of its inputs, as setup.sh computes it
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    stamp = hashlib.sha256(b"".join((tmp_path / p).read_bytes() for p in APP_INPUTS))
    (tmp_path / ".venv" / ".grank-stamp").write_text(f"{stamp.hexdigest()}\n")
    # Airflow's: an environment that exists, with requirements pip cannot satisfy
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / ".venv-airflow")], check=True)
    (tmp_path / "requirements" / "airflow.in").write_text("grank-no-such-package==0.0.1\n")
    (tmp_path / "requirements" / "airflow.lock").write_text("")

    done = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )

    assert done.returncode != 0, done.stdout + done.stderr
    assert "app environment up to date" in done.stdout
    assert "grank-no-such-package" in done.stderr
    assert not (tmp_path / ".venv-airflow" / ".grank-stamp").exists()
