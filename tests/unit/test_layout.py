"""The on-disk layouts are named once, by the layer that writes them (docs/architecture.md)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from features import feature_tables as ft
from features.lake import LakeLayout, partition_days
from grank.config import Settings
from training import data

D1, D2, D3 = date(2000, 12, 8), date(2000, 12, 9), date(2000, 12, 10)


def test_the_layouts_name_the_documented_paths(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path)
    lake = settings.lake_layout()
    tables = settings.feature_tables()
    assert lake == LakeLayout(tmp_path / "lake")
    assert lake.events_partition(D1) == tmp_path / "lake/raw/events/dt=2000-12-08"
    assert lake.items_file == tmp_path / "lake/raw/items/items.parquet"
    assert lake.users_file == tmp_path / "lake/raw/users/users.parquet"
    assert lake.dataset_marker == tmp_path / "lake/raw/_DATASET"
    assert tables == ft.FeatureTables(tmp_path / "features")
    assert tables.partition(ft.TRAINING_EXAMPLES, D1) == (
        tmp_path / "features/training_examples/dt=2000-12-08"
    )
    assert tables.state_dir(ft.USER_STATE) == tmp_path / "features/_state/user_state"


def test_one_day_listing_for_the_lake_the_tables_and_training(tmp_path: Path) -> None:
    """Oldest first, staging folders ignored, an interrupted swap finished before listing."""
    lake = LakeLayout(tmp_path / "lake")
    tables = ft.FeatureTables(tmp_path / "features")
    for folder in (lake.events_dir, tables.table_dir(ft.TRAINING_EXAMPLES)):
        assert partition_days(folder) == []  # not there yet: nothing landed, no error
        (folder / "dt=2000-12-10").mkdir(parents=True)
        (folder / "dt=2000-12-08").mkdir()
        (folder / ".dt=2000-12-11.k3j9.tmp").mkdir()  # a write in progress
        (folder / ".dt=2000-12-09.old").mkdir()  # a crash between the two renames of a swap
    assert lake.landed_days() == [D1, D2, D3]
    assert lake.events_partition(D2).is_dir()  # restored, not lost
    assert data.partition_days(tables.root) == [D1, D2, D3]
    assert tables.days(ft.TRAINING_EXAMPLES) == [D1, D2, D3]
