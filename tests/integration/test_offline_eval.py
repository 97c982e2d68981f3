"""`grank offline-eval` on real ML-100K features: the GTS and leave-one-out tables come out.

The protocols' definitions are tested on hand-made fixtures (test_training_temporal.py);
this checks the command end to end on real data with a tiny model: every variant and
baseline gets a JSON with both targets, the split's numbers are the protocol's.
"""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner

from features import lake
from features.jobs import build_day
from grank.cli import cli
from grank.cli.features_etl import build_spec
from tests.conftest import make_settings

FIRST, LAST = date(1998, 4, 1), date(1998, 4, 22)
TINY = {
    "GRANK_DATASET": "ml-100k",
    "GRANK_TRAIN__DIM": "16",
    "GRANK_TRAIN__N_LAYERS": "1",
    "GRANK_TRAIN__MAX_EPOCHS": "1",
    "GRANK_TRAIN__CANDIDATES_PER_ROW": "16",
    "GRANK_TRAIN__K1": "50",
    "GRANK_TRAIN__BATCH_SIZE": "256",
    "GRANK_FEATURES__SHORT_SEQ_LEN": "16",
    "GRANK_FEATURES__LONG_SEQ_LEN": "32",
}


@pytest.fixture(scope="module")
def root(spark, ml100k_settings, tmp_path_factory) -> Path:
    """The last three weeks of ML-100K landed and their features built (read-only)."""
    settings = make_settings(tmp_path_factory.mktemp("offline_root"))
    source = ml100k_settings.lake_dir
    for day in (d for d in lake.landed_days(source) if FIRST <= d <= LAST):
        shutil.copytree(lake.partition_dir(source, day), lake.partition_dir(settings.lake_dir, day))
    for name in ("items", "users"):
        shutil.copytree(source / "raw" / name, settings.lake_dir / "raw" / name)
    build_day(spark, build_spec(settings), LAST, rebuild=True)
    return settings.data_root


def test_gts_and_leave_one_out_tables(root: Path) -> None:
    env = {**TINY, "GRANK_DATA_ROOT": str(root)}
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["offline-eval", "--variants", "grank,generator_only,all_features"],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "test users" in result.output
    out = root / "offline" / "gts"
    names = {p.stem for p in out.glob("*.json")}
    assert names == {
        "grank",
        "generator_only",
        "all_features",
        "popularity_all_time",
        "popularity_7d",
    }
    grank = json.loads((out / "grank.json").read_text())
    # each target under serving's seen filter and under the literature's (whole history)
    assert set(grank["results"]) == {
        "last",
        "successive",
        "last_history_filter",
        "successive_history_filter",
    }
    for target in ("last", "successive"):
        # a user rates an item once, so filtering more of the history only removes
        # irrelevant items ahead of the relevant ones: never a lower score
        serving = grank["results"][target]["generator/filtered"]
        literature = grank["results"][f"{target}_history_filter"]["generator/filtered"]
        assert all(literature[m] >= serving[m] - 1e-9 for m in serving), (serving, literature)
    assert set(grank["results"]["last"]) == {"generator/filtered", "rank/filtered"}
    assert grank["next_day_windows"] is False  # the protocol's task by default
    # ...so validation chose where the user vector is read, and the report says which
    readouts = grank["user_vector_scores"]
    assert set(readouts) == {"newest", "query", "both"}
    assert readouts[grank["user_vector"]] == max(readouts.values())
    # the catch-up's length was chosen on the trial inside (T_val, T_test], not on the test
    trial = grank["catchup_trial_scores"]
    assert set(trial) == {"0", "1", "2", "4"}
    assert trial[str(grank["catchup_epochs"])] == max(trial.values())
    only = json.loads((out / "generator_only.json").read_text())
    assert set(only["results"]["last"]) == {"generator/filtered"}
    for metrics in grank["results"]["successive"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["recall@10"] <= 1.0
        # each mean comes with its 95% interval over the test users
        assert metrics["ndcg@10.low"] <= metrics["ndcg@10"] <= metrics["ndcg@10.high"]
        assert metrics["ndcg@10.low"] < metrics["ndcg@10.high"]

    loo = runner.invoke(
        cli,
        ["offline-eval", "--protocol", "loo", "--variants", "grank", "--next-day-windows"],
        env=env,
        catch_exceptions=False,
    )
    assert loo.exit_code == 0, loo.output
    assert {p.stem for p in (root / "offline" / "loo").glob("*.json")} == {
        "grank",
        "popularity_all_time",
    }
    loo_grank = json.loads((root / "offline" / "loo" / "grank.json").read_text())
    assert loo_grank["next_day_windows"]  # U trained as it serves: nothing to choose
    assert loo_grank["user_vector"] == "query" and loo_grank["user_vector_scores"] == {}
    bad = runner.invoke(cli, ["offline-eval", "--variants", "sasrec"], env=env)
    assert bad.exit_code != 0 and "unknown variants ['sasrec']" in str(bad.exception)
