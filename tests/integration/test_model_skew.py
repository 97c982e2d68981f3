"""The online/offline skew check on real ML-100K features, a real Spark build and real Feast.

Serving's inputs (the Feast online store after materializing D) must equal training's
(the feature tables, point in time, for a prediction on D+1). Materializing the next day
instead, i.e. features shifted by one day, must be caught.
"""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner

from common.errors import UserFacingError
from features import lake
from features.jobs import build_day
from grank.cli import cli
from grank.cli.features_etl import build_spec
from tests.conftest import make_settings

FIRST, DAY, NEXT = date(1998, 3, 25), date(1998, 4, 1), date(1998, 4, 2)


@pytest.fixture(scope="module")
def root(spark, ml100k_settings, tmp_path_factory) -> Path:
    """ML-100K 1998-03-25..04-02 landed; features of 04-01 (bootstrap) built."""
    settings = make_settings(tmp_path_factory.mktemp("skew_root"))
    source = ml100k_settings.lake_dir
    for day in (d for d in lake.landed_days(source) if FIRST <= d <= NEXT):
        shutil.copytree(lake.partition_dir(source, day), lake.partition_dir(settings.lake_dir, day))
    for name in ("items", "users"):
        shutil.copytree(source / "raw" / name, settings.lake_dir / "raw" / name)
    build_day(spark, build_spec(settings), DAY, rebuild=True)
    return settings.data_root


def grank(root: Path, *args: str) -> tuple[int, str]:
    # a model that reads every feature group and the events' times: every input compared
    env = {
        "GRANK_DATA_ROOT": str(root),
        "GRANK_DATASET": "ml-100k",
        "GRANK_TRAIN__FEATURE_GROUPS": '["behaviors", "user_profile", "item_features"]',
        "GRANK_TRAIN__TIME_GAPS": "true",
    }
    result = CliRunner().invoke(cli, list(args), env=env)
    if isinstance(result.exception, UserFacingError):
        return 1, result.output + f"error: {result.exception}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_serving_reads_what_training_reads_and_a_day_shift_is_caught(root: Path) -> None:
    assert grank(root, "features", "register")[0] == 0
    assert grank(root, "features", "materialize", "--date", str(DAY))[0] == 0
    code, out = grank(root, "model", "skew", "--date", str(DAY), "--users", "40")
    assert code == 0, out
    assert f"no skew for {DAY}: 40 users and 200 items" in out
    # the online store moves on to the next day while training would read DAY: skew
    # (built only now: materializing a day also writes every later built day's rows)
    assert grank(root, "features", "build", "--date", str(NEXT))[0] == 0
    assert grank(root, "features", "materialize", "--date", str(NEXT))[0] == 0
    code, out = grank(root, "model", "skew", "--date", str(DAY), "--users", "40")
    assert code == 1, out
    assert "skew: short sequence of" in out  # users active on the next day moved on
    assert "online/offline differences for 1998-04-01" in out
