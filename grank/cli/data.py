"""``grank data``: fetch the real datasets, land them into the raw lake, generate scale data."""

from __future__ import annotations

from datetime import date

import click

from grank.cli.options import DATE, date_window
from grank.config import Settings


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


@data.command()
@click.option("--date", "day", type=DATE, help="Land one logical day.")
@click.option("--from", "first", type=DATE, help="First day of a range.")
@click.option("--to", "last", type=DATE, help="Last day of a range (inclusive).")
@click.option("--all", "land_all", is_flag=True, help="Land every day of the dataset.")
@click.pass_obj
def land(
    settings: Settings, day: date | None, first: date | None, last: date | None, land_all: bool
) -> None:
    """Replay the configured dataset into raw/events/dt=YYYY-MM-DD/ (idempotent)."""
    import pyarrow.parquet as pq

    from features import lake
    from features.datasets import load_events

    lake.claim_lake(settings.lake_dir, settings.dataset)
    events = lake.to_lake_events(load_events(settings.dataset, settings.datasets_dir))
    if land_all:
        if day or first or last:
            raise click.UsageError("--all takes no --date/--from/--to")
        first, last = lake.dataset_day_range(events)
    else:
        first, last = date_window(day, first, last)
    report = lake.land_days(settings.lake_dir, events, first, last, require_events=first == last)
    folder = settings.datasets_dir / settings.dataset
    lake.land_dimensions(
        settings.lake_dir,
        pq.read_table(folder / "items.parquet"),
        pq.read_table(folder / "users.parquet"),
    )
    unchanged = len(report.unchanged_days)
    click.echo(
        f"landed {report.total_events:,} events in {len(report.events_per_day)} partitions"
        f" ({first}..{last}, {len(report.empty_days)} days without events, {unchanged}"
        f" already landed with the same content) under {lake.events_dir(settings.lake_dir)}"
    )


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
    from features.synthetic import SyntheticSpec, generate

    lake.claim_lake(settings.lake_dir, f"synthetic-{seed}")
    spec = SyntheticSpec(users=users, items=items, events=events, days=days, start=start, seed=seed)
    written = generate(spec, settings.lake_dir)
    click.echo(f"generated {written:,} synthetic events in {days} partitions")
