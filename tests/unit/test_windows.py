"""The window count columns follow the one windows setting everywhere (docs/features.md,
"windows"): the Feast schema and services, the quality checks, the names a dataset config
may not take and the model's inputs. No Spark, no data (Feast's import: seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from features.dataset_config import DimensionSpec
from features.feast_repo.definitions import ITEM_FEATURES, USER_FEATURES, build_definitions
from features.quality import window_expectations
from grank.config import Settings
from training.inputs import InputSpec

WINDOWS = (1, 14)


def test_the_feast_schema_and_services_name_the_configured_windows(tmp_path: Path) -> None:
    from feast import FeatureService, FeatureView

    objects = build_definitions(tmp_path, windows_days=WINDOWS)
    views = {o.name: o for o in objects if isinstance(o, FeatureView)}
    items = [f.name for f in views[ITEM_FEATURES].features]
    assert items[:3] == ["pop_1d", "pop_14d", "pop_total"] and "pop_7d" not in items
    users = [f.name for f in views[USER_FEATURES].features]
    assert users[:3] == ["events_1d", "events_14d", "events_total"] and "events_7d" not in users
    services = {
        o.name: {p.name: [f.name for f in p.features] for p in o.feature_view_projections}
        for o in objects
        if isinstance(o, FeatureService)
    }
    assert services["grank_item_context_v1"] == {
        ITEM_FEATURES: ["pop_1d", "pop_14d", "pop_total", "age_days"]
    }
    # the profile has no one-day count: the sequence carries the day's own activity
    profile = services["user_profile_v1"][USER_FEATURES]
    assert profile[:4] == ["events_14d", "events_total", "mean_value", "tenure_days"]


def pairs(checks: list[dict]) -> list[tuple[str, ...]]:
    """Each check as (its column) or (column_A, column_B) of ``column_A >= column_B``."""
    return [tuple(v for k, v in c["kwargs"].items() if k.startswith("column")) for c in checks]


def test_the_quality_checks_chain_the_configured_windows() -> None:
    checks = window_expectations(WINDOWS)
    assert pairs(checks[ITEM_FEATURES]) == [
        ("pop_1d",),
        ("pop_14d", "pop_1d"),
        ("pop_total", "pop_14d"),
    ]
    assert pairs(checks[USER_FEATURES]) == [("events_total", "events_14d")]
    assert all(c["severity"] == "critical" for s in checks.values() for c in s)
    assert window_expectations(WINDOWS) == checks  # the same ids every run
    # the default windows: the checks the suites held before the windows were a setting
    default = window_expectations((1, 7, 30))
    assert [(c["type"], c["kwargs"]) for c in default[ITEM_FEATURES]] == [
        ("expect_column_values_to_be_between", {"column": "pop_1d", "min_value": 0.0}),
        *(
            (
                "expect_column_pair_values_a_to_be_greater_than_b",
                {"column_A": a, "column_B": b, "or_equal": True},
            )
            for a, b in (("pop_7d", "pop_1d"), ("pop_30d", "pop_7d"), ("pop_total", "pop_30d"))
        ),
    ]
    assert pairs(default[USER_FEATURES]) == [("events_total", "events_30d")]


@pytest.mark.parametrize("name", ["pop_14d", "events_90d", "pop_total", "tenure_days"])
def test_a_count_column_of_any_window_is_no_attribute_name(name: str) -> None:
    with pytest.raises(ValidationError, match="reserved by the feature tables"):
        DimensionSpec(id_column="i", attributes={name: "int64"})
    DimensionSpec(id_column="i", attributes={"popularity_14d": "int64", "pop_14days": "int64"})


def test_the_model_inputs_are_the_configured_windows_unless_set(tmp_path: Path) -> None:
    windows = {"popularity_windows_days": WINDOWS}
    settings = Settings(data_root=tmp_path, features=windows, train={"recent_popularity_days": 14})
    assert settings.train.inputs.item_numeric == ("pop_1d", "pop_14d", "pop_total", "age_days")
    assert settings.train.inputs.user_numeric[0] == "events_14d"
    # the recent-popularity baseline is named after, and ranks by, the chosen window
    assert settings.train.recent_popularity_baseline == "popularity_14d"
    assert settings.train.recent_popularity_column == "pop_14d"
    chosen = {"recent_popularity_days": 14, "inputs": {"item_numeric": ["pop_14d"]}}
    settings = Settings(data_root=tmp_path, features=windows, train=chosen)
    assert settings.train.inputs == InputSpec(item_numeric=("pop_14d",))
