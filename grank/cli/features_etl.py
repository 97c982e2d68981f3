"""``grank features build|validate|report``: the Spark ETL, its quality gates and their report."""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

import click

from grank.cli.options import DATE, date_window, each_day, echo_asset_event
from grank.config import Settings

if TYPE_CHECKING:
    from features.jobs import BuildSpec


def build_spec(settings: Settings) -> BuildSpec:
    """The job's plain arguments from Settings (layers never read grank.config)."""
    from features.jobs import BuildSpec
    from grank.dataset import lake_config, spark_attributes

    dataset = lake_config(settings)
    return BuildSpec(
        lake_dir=settings.lake_dir,
        features_dir=settings.features_dir,
        quarantine_dir=settings.quarantine_dir,
        config=settings.build_config(),
        item_attributes=spark_attributes(dataset.item_attributes),
        user_attributes=spark_attributes(dataset.user_attributes),
    )


@click.command()
@click.option("--date", "day", type=DATE, help="Build one logical day.")
@click.option("--from", "first", type=DATE, help="First day of a backfill.")
@click.option("--to", "last", type=DATE, help="Last day of a backfill (inclusive).")
@click.option(
    "--rebuild", is_flag=True, help="Recompute from all history up to the end of the day."
)
@click.pass_obj
def build(
    settings: Settings, day: date | None, first: date | None, last: date | None, rebuild: bool
) -> None:
    """Build the feature tables of a day (or of each landed day of a backfill, in order).

    A raw day that landed late or was corrected after later days were built makes this
    cascade first: every built day from that raw day on is rebuilt, in order, one line each.
    """
    from features.jobs import BuildResult, build, quarantined_raw_days
    from features.lake import landed_days
    from features.spark import get_session

    first, last = date_window(day, first, last)
    if first == last:
        days = [first]
    else:
        # quarantined days stay in the list so that the build stops there with the reason
        known = {*landed_days(settings.lake_dir), *quarantined_raw_days(settings.quarantine_dir)}
        days = [d for d in each_day(first, last) if d in known]
        click.echo(f"backfill {first}..{last}: {len(days)} landed days to build")
    spec = build_spec(settings)
    spark = get_session(settings.spark_config())

    done: set[date] = set()

    def report(result: BuildResult) -> None:
        done.add(result.day)
        if result.reason:
            click.echo(result.reason)
        cascade = " (cascade)" if result.cascade else ""
        click.echo(
            f"{result.day}: {result.mode}{cascade}, {result.events:,} events, training examples"
            f" for {len(result.example_days)} day(s) under {settings.features_dir}"
        )

    for index, target in enumerate(days):
        if target not in done:  # a cascade earlier in this backfill may have built it
            build(spark, spec, target, rebuild=rebuild and index == 0, on_built=report)


@click.command()
@click.option("--date", "day", type=DATE, required=True, help="Logical day to validate.")
@click.option(
    "--stage",
    type=click.Choice(["raw", "features"]),
    default="raw",
    show_default=True,
    help="raw: the landed events of the day; features: the built feature partitions of the day.",
)
@click.pass_obj
def validate(settings: Settings, day: date, stage: str) -> None:
    """Run the Great Expectations gate; a critical failure quarantines the partition, exit 1.

    Either way the day's report pages and the report home page are rebuilt.
    """
    from common.errors import UserFacingError
    from features.quality import QualitySpec, validate_features, validate_raw
    from grank.dataset import lake_config

    dataset = lake_config(settings)
    spec = QualitySpec(
        lake_dir=settings.lake_dir,
        features_dir=settings.features_dir,
        quarantine_dir=settings.quarantine_dir,
        reports_dir=settings.reports_dir,
        config=settings.quality_config(),
        long_seq_len=settings.features.long_seq_len,
        windows_days=settings.build_config().windows_days,
        event_types=dataset.events.lake_types,
        value_min=dataset.values.min,
        value_max=dataset.values.max,
    )
    outcome = validate_raw(spec, day) if stage == "raw" else validate_features(spec, day)
    for warning in outcome.warnings:
        click.echo(f"warning: {warning}")
    where = f"report: {outcome.report}; all days: {outcome.home}"
    if not outcome.success:
        raise UserFacingError(
            f"{stage} quality gate failed for {day} ({'; '.join(outcome.failures)});"
            f" quarantined under {settings.quarantine_dir}; {where}"
        )
    click.echo(f"{stage} quality gate passed for {day}; {where}")
    if stage == "features":  # the day's partitions passed: the asset event names them
        from features.feature_tables import PUBLIC_TABLES, partition_path, table_dir

        partitions = {
            table: partition_path(table_dir(settings.features_dir, table), day)
            for table in PUBLIC_TABLES
        }
        echo_asset_event({"logical_date": day, "paths": partitions, "report": outcome.report})


@click.command()
@click.pass_obj
def report(settings: Settings) -> None:
    """Rebuild every quality report page (all days, the trend) from the stored GX results."""
    from features.quality_report import render_all

    home = render_all(settings.reports_dir)
    click.echo(f"quality report of all days: {home}")


COMMANDS: list[click.Command] = [build, validate, report]
