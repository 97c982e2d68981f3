"""``grank features``: the Spark ETL and quality gates (features_etl) and Feast (features_store)."""

from __future__ import annotations

import click

from grank.cli.features_etl import COMMANDS as ETL_COMMANDS
from grank.cli.features_store import COMMANDS as STORE_COMMANDS


@click.group()
def features() -> None:
    """Feature tables, data quality gates and the Feast feature store."""


for _command in (*ETL_COMMANDS, *STORE_COMMANDS):
    features.add_command(_command)
