"""``grank data``: fetch the real datasets, land them into the raw lake, generate scale data."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import click

from grank.cli.options import DATE, date_window
from grank.config import Settings

if TYPE_CHECKING:
    from features.ingest import Window


@click.group()
def data() -> None:
    """Datasets and the raw event lake."""


@data.command()
@click.argument("names", nargs=-1, type=click.Choice(["ml-1m", "ml-100k"]))
@click.pass_obj
def fetch(settings: Settings, names: tuple[str, ...]) -> None:
    """Download, verify (sha256) and convert MovieLens datasets (default: the configured one)."""
    from features.datasets import fetch as fetch_dataset

    for name in names or (settings.dataset,):
        count = fetch_dataset(name, settings.downloads_dir, settings.datasets_dir)
        click.echo(f"{name}: {count:,} ratings ready in {settings.datasets_dir / name}")


def _window(
    day: date | None, first: date | None, last: date | None, land_all: bool
) -> tuple[Window, bool]:
    """The days to land and whether each must have events (a single day must)."""
    from features.ingest import Window

    if land_all:
        if day or first or last:
            raise click.UsageError("--all takes no --date/--from/--to")
        return Window(None, None), False
    lo, hi = date_window(day, first, last)
    return Window(lo, hi), lo == hi


def _run_ingest(
    settings: Settings,
    config_path: Path,
    window: Window,
    require_events: bool,
    paths: tuple[str, ...] = (),
    items: tuple[str, ...] = (),
    users: tuple[str, ...] = (),
) -> None:
    from common.errors import UserFacingError
    from features import dataset_config, ingest, lake

    config = dataset_config.load(config_path)
    base = config_path.resolve().parent
    event_patterns = paths or config.events.paths
    if not event_patterns:
        raise UserFacingError("no event files: pass paths or set events.paths in the config")

    def files(given: tuple[str, ...], spec: dataset_config.DimensionSpec | None) -> list[str]:
        patterns = given or ((spec.path,) if spec is not None and spec.path else ())
        return ingest.resolve(patterns, base, settings.data_root) if patterns else []

    report = ingest.ingest(
        config,
        settings.lake_dir,
        ingest.resolve(event_patterns, base, settings.data_root),
        window,
        item_files=files(items, config.items),
        user_files=files(users, config.users),
        require_events=require_events,
    )
    days = sorted(report.events_per_day)
    span = f"{days[0]}..{days[-1]}" if days else "no days"
    click.echo(
        f"{config.name}: landed {report.total_events:,} events in {len(days)} partitions"
        f" ({span}, {len(report.empty_days)} days without events,"
        f" {report.outside_window:,} events outside the window skipped); {report.items:,} items,"
        f" {report.users:,} users under {lake.events_dir(settings.lake_dir).parent}"
    )


@data.command()
@click.option("--date", "day", type=DATE, help="Land one logical day.")
@click.option("--from", "first", type=DATE, help="First day of a range.")
@click.option("--to", "last", type=DATE, help="Last day of a range (inclusive).")
@click.option("--all", "land_all", is_flag=True, help="Land every day of the dataset.")
@click.pass_obj
def land(
    settings: Settings, day: date | None, first: date | None, last: date | None, land_all: bool
) -> None:
    """Replay the configured MovieLens dataset into the raw lake (idempotent: same bytes).

    The replay is an ingest with the shipped config features/datasets/<dataset>.toml.
    """
    from features.dataset_config import builtin

    window, require = _window(day, first, last, land_all)
    _run_ingest(settings, builtin(settings.dataset), window, require)


@data.command()
@click.argument("paths", nargs=-1)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Dataset config (TOML or YAML, docs/ingestion.md).",
)
@click.option("--date", "day", type=DATE, help="Land one UTC day of the input.")
@click.option("--from", "first", type=DATE, help="First day of a range.")
@click.option("--to", "last", type=DATE, help="Last day of a range (inclusive).")
@click.option("--all", "land_all", is_flag=True, help="Land every day the input has.")
@click.option("--items", multiple=True, help="Item dimension file(s) (default: the config's).")
@click.option("--users", multiple=True, help="User dimension file(s) (default: the config's).")
@click.pass_obj
def ingest(
    settings: Settings,
    paths: tuple[str, ...],
    config_path: Path,
    day: date | None,
    first: date | None,
    last: date | None,
    land_all: bool,
    items: tuple[str, ...],
    users: tuple[str, ...],
) -> None:
    """Land events from Parquet, CSV or JSON Lines files (paths, globs, fsspec URLs).

    PATHS default to the config's events.paths. Each day of the window replaces its
    partition raw/events/dt=YYYY-MM-DD/ whole; ids go through the lake's id maps.
    """
    window, require = _window(day, first, last, land_all)
    _run_ingest(settings, config_path, window, require, paths, items, users)


@data.command()
@click.option("--date", "day", type=DATE, required=True, help="Logical day to check.")
@click.pass_obj
def landed(settings: Settings, day: date) -> None:
    """Exit 0 when the day's raw partition is complete: its _SUCCESS marker verifies.

    What the scheduler's sensor calls: it knows nothing of the lake's layout.
    """
    from common.errors import UserFacingError
    from features import lake

    problem = lake.verify_marker(settings.lake_dir, day)
    if problem:
        raise UserFacingError(problem)
    click.echo(f"raw events of {day} have landed: {lake.partition_dir(settings.lake_dir, day)}")


@data.command()
@click.option("--users", type=int, default=100_000, show_default=True)
@click.option("--items", type=int, default=50_000, show_default=True)
@click.option("--events", type=int, default=1_000_000, show_default=True)
@click.option("--days", type=int, default=30, show_default=True)
@click.option("--start", type=DATE, default="2024-01-01", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_obj
def synth(
    settings: Settings, users: int, items: int, events: int, days: int, start: date, seed: int
) -> None:
    """Generate a synthetic lake for scale benchmarks (Zipf popularity, sessions; by seed)."""
    from features import lake
    from features.dataset_config import builtin, load, save_to_lake
    from features.synthetic import SyntheticSpec, generate

    lake.claim_lake(settings.lake_dir, f"synthetic-{seed}")
    save_to_lake(settings.lake_dir, load(builtin("synthetic")))
    spec = SyntheticSpec(users=users, items=items, events=events, days=days, start=start, seed=seed)
    written = generate(spec, settings.lake_dir)
    click.echo(f"generated {written:,} synthetic events in {days} partitions")
