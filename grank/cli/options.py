"""Options and helpers shared by several command modules (one definition each)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import click

from common.errors import UserFacingError


class DateParam(click.ParamType):
    """A logical date written ``YYYY-MM-DD``; anything else is a usage error naming the value."""

    name = "YYYY-MM-DD"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> date:
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a date in YYYY-MM-DD form", param, ctx)


DATE = DateParam()


def date_window(day: date | None, first: date | None, last: date | None) -> tuple[date, date]:
    """Resolve ``--date D`` or ``--from A --to B`` into an inclusive range; exactly one form."""
    if day is not None and (first or last):
        raise UserFacingError("give either --date or --from/--to, not both")
    if day is not None:
        return day, day
    if first is None or last is None:
        raise UserFacingError("give --date D, or both --from A and --to B")
    if first > last:
        raise UserFacingError(f"--from {first} is after --to {last}")
    return first, last


def each_day(first: date, last: date) -> Iterator[date]:
    """Every day of an inclusive range, oldest first."""
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)


def echo_asset_event(record: dict[str, Any]) -> None:
    """Print what a command wrote as its last output line: one JSON object (an Asset event).

    The daily DAG attaches that line to the task's Asset events as ``extra``
    (docs/airflow.md), so other teams' DAGs learn the day and the paths from the event.
    Dates are ISO strings, paths absolute.
    """
    click.echo(json.dumps(record, sort_keys=True, default=str))
