"""Commands of ``grank features`` owned by this module (added to the group in features.py).

``register`` (feast apply), ``materialize`` (one logical day or a range into the online
store) and ``serve`` (the read-only lookup server other teams call).
"""

from __future__ import annotations

from datetime import date

import click

from grank.cli.options import DATE, date_window, echo_asset_event
from grank.config import Settings


@click.command()
@click.pass_obj
def register(settings: Settings) -> None:
    """Register entities, feature views and services in Feast (feast apply; repeatable)."""
    from features.feature_store import open_store
    from features.feature_store import register as apply_definitions
    from grank.dataset import lake_config

    config = settings.store_config()
    dataset = lake_config(settings)
    registered = apply_definitions(
        open_store(config),
        settings.features_dir,
        user_attributes=dataset.user_attributes,
        item_attributes=dataset.item_attributes,
        windows_days=settings.build_config().windows_days,
    )
    click.echo(
        f"registered project {config.project} ({config.registry} registry,"
        f" {config.online_store} online store)"
    )
    for kind, names in registered.items():
        click.echo(f"  {kind}: {', '.join(names)}")


@click.command()
@click.option("--date", "day", type=DATE, help="Materialize one logical day.")
@click.option("--from", "first", type=DATE, help="First day of a range (a backfill).")
@click.option("--to", "last", type=DATE, help="Last day of a range (inclusive).")
@click.pass_obj
def materialize(
    settings: Settings, day: date | None, first: date | None, last: date | None
) -> None:
    """Load the feature tables of a day (or a range) into the online store; show one lookup.

    The window of day D is [D 00:00, D+1 00:00) UTC, never derived from the clock, so a
    re-run of D writes the same values (idempotent); when later days are built (a late
    or corrected day cascaded through them) it extends to the latest one. A row never
    replaces one from a later day. Lookups keep working meanwhile. The
    last line (JSON) says what the online store now holds (for the DAG's Asset event).
    """
    from features.feast_repo.definitions import USER_SEQUENCES
    from features.feature_store import (
        day_window,
        materialize_window,
        online_sequences,
        open_store,
        read_window,
    )
    from features.lineage import built_days

    first, last = date_window(day, first, last)
    logical = last
    # a late or corrected day cascaded through the later built days: they changed too
    later = [d for d in built_days(settings.features_dir) if d > last]
    if later:
        click.echo(f"later days are built: the window extends to {later[-1]}")
        last = later[-1]
    store = open_store(settings.store_config())
    written = materialize_window(
        store, settings.features_dir, first, last, batch_rows=settings.feast.write_batch_rows
    )
    summary = ", ".join(f"{view} {rows:,}" for view, rows in written.items())
    click.echo(f"{first}..{last}: wrote {summary} rows to the online store")
    keys = ["user_id", "event_timestamp", "created"]
    users = read_window(settings.features_dir, USER_SEQUENCES, first, last, "user_id", keys)
    if users.num_rows:
        user_id = int(users["user_id"][0].as_py())
        found = online_sequences(store, [user_id])[user_id]
        if found is not None:
            click.echo(
                f"example lookup user_id={user_id}: seq_len={found['seq_len']},"
                f" last items {found['item_seq'][-10:]}"
            )
    echo_asset_event(
        {
            "logical_date": logical,
            "window_start": day_window(first)[0].isoformat(),
            "window_end": day_window(last)[1].isoformat(),
            "feast_project": settings.feast.project,
            "rows": written,
        }
    )


@click.command()
@click.option("--host", default=None, help="Bind address (default: settings, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: settings, 6566).")
@click.pass_obj
def serve(settings: Settings, host: str | None, port: int | None) -> None:
    """Serve read-only online lookups over HTTP (POST /get-online-features, docs at /docs).

    Writes nothing, not even ``feature_store.yaml``: in production it runs with read-only
    store credentials of its own (docs/deployment.md).
    """
    import uvicorn

    from features.feature_store import connect
    from features.lookup_server import create_app

    app = create_app(connect(settings.store_config()), settings.lookup_limits())
    uvicorn.run(
        app,
        host=host or settings.feast.server_host,
        port=port or settings.feast.server_port,
        log_level="warning",
    )


COMMANDS: list[click.Command] = [register, materialize, serve]
