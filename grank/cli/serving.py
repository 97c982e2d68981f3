"""``grank embeddings``, ``grank snapshot`` and ``grank serve``: from a checkpoint to live traffic.

Daily order (the DAG's tail): ``embeddings refresh --date D`` → ``snapshot publish --date D``
→ a running ``grank serve`` swaps on its own → ``snapshot await-serving`` proves it did.
"""

from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path
from typing import Any

import click

from common.errors import UserFacingError
from grank.cli.options import DATE, echo_asset_event
from grank.config import Settings


def embeddings_dir(settings: Settings, day: date) -> Path:
    """Where the refresh for ``day`` writes (and publish reads): ``embeddings/dt=D/``."""
    from serving.bundle import bundle_dir

    return bundle_dir(settings.embeddings_dir, day)


def evaluation_metrics(settings: Settings, checkpoint_id: str) -> dict[str, Any] | None:
    """The gate's report of the evaluation that published ``checkpoint_id``, if any."""
    from training.registry import checkpoint_day

    path = settings.model_registry().evaluation_dir(checkpoint_day(checkpoint_id))
    if not (path / "metrics.json").is_file():
        return None
    report = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    if report.get("checkpoint") != checkpoint_id:
        return None
    return {"day": report.get("day"), "gate": report.get("gate"), "results": report.get("results")}


def _catalogue_and_popularity(settings: Settings, day: date) -> tuple[list[int], list[int]]:
    """Item ids of the lake's catalogue, and ids by popularity up to ``day`` (most first).

    Popularity comes from the ``item_features`` partition of ``day`` (the count of the last
    ``train.recent_popularity_days``, then the all-time count, then the item id: the order
    the gate's popularity baseline ranks by), read as plain Parquet so no Spark is needed.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from features.feature_tables import ITEM_FEATURES

    items_path = settings.lake_layout().items_file
    if not items_path.is_file():
        raise UserFacingError(f"no item catalogue at {items_path}: run `grank data land` first")
    catalogue = pq.read_table(items_path, columns=["item_id"]).column("item_id").to_pylist()
    features_path = settings.feature_tables().partition(ITEM_FEATURES, day)
    if not features_path.is_dir():
        raise UserFacingError(
            f"no {ITEM_FEATURES} for {day} at {features_path}: run `grank features build` first"
        )
    recent = settings.train.recent_popularity_column
    table = pq.read_table(features_path, columns=["item_id", recent, "pop_total"])
    order = pc.sort_indices(
        table,
        sort_keys=[(recent, "descending"), ("pop_total", "descending"), ("item_id", "ascending")],
    )
    popular = table.take(order).column("item_id").to_pylist()
    return catalogue, popular


@click.group()
def embeddings() -> None:
    """Item embeddings computed from the published model."""


@embeddings.command()
@click.option("--date", "day", type=DATE, required=True, help="Logical date of the run.")
@click.option(
    "--checkpoint",
    help="Checkpoint id (default: the published model; none published: popularity only).",
)
@click.pass_obj
def refresh(settings: Settings, day: date, checkpoint: str | None) -> None:
    """Compute every catalogue item's vector into embeddings/dt=D/ (float32 + ids + weights)."""
    from serving.bundle import refresh_embeddings, write_popularity_bundle

    catalogue, popular = _catalogue_and_popularity(settings, day)
    registry = settings.model_registry()
    checkpoint = checkpoint or registry.published()
    out = embeddings_dir(settings, day)
    if checkpoint is None:
        report = write_popularity_bundle(out, catalogue, popular)
        click.echo(
            f"no model has passed the gate yet: {report.item_count:,} items by popularity"
            f" into {out} (serving answers from popularity and says so)"
        )
        return
    report = refresh_embeddings(
        registry.checkpoint_path(checkpoint),
        out,
        catalogue,
        popular,
        batch_size=settings.serve.refresh_batch_size,
        metrics=evaluation_metrics(settings, checkpoint),
    )
    click.echo(f"refreshed {report.item_count:,} items x {report.dim} into {report.out_dir}")


@click.group()
def snapshot() -> None:
    """Serving snapshots: publish, list, verify, roll back, await a server's swap."""


@snapshot.command()
@click.option("--date", "day", type=DATE, required=True, help="Logical date of the refresh.")
@click.option("--keep", type=int, help="Versions to keep (default: serve.keep_snapshots).")
@click.option("--force", is_flag=True, help="Publish even if CURRENT already serves the same.")
@click.pass_obj
def publish(settings: Settings, day: date, keep: int | None, force: bool) -> None:
    """Publish embeddings/dt=D/ as a new verified version and point CURRENT at it.

    Skipped (exit 0) when it would change nothing or go back in time: CURRENT already
    serves the same model, or a newer day (a re-run or backfill of an old day).
    """
    from serving.sequences import GENERATOR_SERVICE, RANKER_SERVICE
    from serving.snapshots import current_manifest, publish_snapshot

    source = embeddings_dir(settings, day)
    if not source.is_dir():
        raise UserFacingError(
            f"no embeddings for {day} at {source}: run `grank embeddings refresh`"
        )
    current = current_manifest(settings.snapshots_dir)
    skip = None if force else _publish_skip_reason(current, source, day)
    if skip is not None and current is not None:
        click.echo(f"not published: {skip}")
        # the DAG's asset event still says what serves: consumers see ``changed`` false
        echo_asset_event(
            {
                "logical_date": day,
                "changed": False,
                "reason": skip,
                "version": current["version"],
                "path": settings.snapshots_dir / current["version"],
            }
        )
        return
    version = publish_snapshot(
        settings.snapshots_dir,
        source,
        day,
        {"feature_services": [GENERATOR_SERVICE, RANKER_SERVICE], "dataset": settings.dataset},
        keep=keep or settings.serve.keep_snapshots,
    )
    click.echo(f"published snapshot {version}; CURRENT -> {version}")
    echo_asset_event(
        {
            "logical_date": day,
            "changed": True,
            "version": version,
            "path": settings.snapshots_dir / version,
        }
    )


def _publish_skip_reason(current: dict[str, Any] | None, source: Path, day: date) -> str | None:
    """Why publishing ``source`` for ``day`` would be wrong or pointless (None: publish)."""
    from serving.bundle import bundle_checkpoint_id

    if current is None:
        return None
    served_day = date.fromisoformat(current["logical_date"])
    if served_day > day:
        return f"CURRENT serves {current['version']}, of a later day than {day}"
    checkpoint = bundle_checkpoint_id(source)
    if checkpoint is not None and checkpoint == current.get("checkpoint_id"):
        return f"CURRENT ({current['version']}) already serves the model {checkpoint}"
    if checkpoint is None and current.get("checkpoint_id") is not None:
        return f"CURRENT serves the model {current['checkpoint_id']}; never replaced by popularity"
    return None


@snapshot.command("list")
@click.pass_obj
def list_command(settings: Settings) -> None:
    """Published versions, oldest first (* marks CURRENT)."""
    from serving.snapshots import list_snapshots

    infos = list_snapshots(settings.snapshots_dir)
    if not infos:
        click.echo(f"no snapshots in {settings.snapshots_dir}")
    for info in infos:
        m = info.manifest
        click.echo(
            f"{'*' if info.is_current else ' '} {info.version}  items={m.get('item_count')}"
            f"  dim={m.get('dim')}  checkpoint={m.get('checkpoint_id')}"
            f"  created={m.get('created_at')}"
        )


@snapshot.command()
@click.argument("version", required=False)
@click.pass_obj
def verify(settings: Settings, version: str | None) -> None:
    """Check every checksum of VERSION (default: CURRENT)."""
    from serving.manifest import verify_snapshot
    from serving.snapshots import read_current, version_dir

    version = version or read_current(settings.snapshots_dir)
    if version is None:
        raise UserFacingError(f"no CURRENT snapshot in {settings.snapshots_dir}")
    manifest = verify_snapshot(version_dir(settings.snapshots_dir, version))
    click.echo(f"snapshot {version} verified ({len(manifest['files'])} files)")


@snapshot.command()
@click.option("--to", "to", help="Version to restore (default: the one before CURRENT).")
@click.option(
    "--reason",
    default="snapshot rollback",
    show_default=True,
    help="Why (kept in models/published.log).",
)
@click.pass_obj
def rollback(settings: Settings, to: str | None, reason: str) -> None:
    """Point CURRENT back at an earlier version, and PUBLISHED at the model it holds.

    Both pointers move together: the next day's warm start then continues from the model
    that serves, not from the one rolled back.
    """
    from serving.snapshots import point_current, read_manifest_of, rollback_target

    version = rollback_target(settings.snapshots_dir, to)
    checkpoint = read_manifest_of(settings.snapshots_dir, version).get("checkpoint_id")
    # the model pointer first: killed in between, the next day trains from the right model
    # and a re-run of this command moves CURRENT
    previous = settings.model_registry().promote(checkpoint, "snapshot rollback", reason)
    point_current(settings.snapshots_dir, version)
    click.echo(f"CURRENT -> {version}; PUBLISHED: {previous} -> {checkpoint}")


@snapshot.command("await-serving")
@click.option("--url", default=None, help="Server base URL (default: http://serve.host:port).")
@click.option("--version", "version", help="Version to wait for (default: CURRENT).")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds.")
@click.pass_obj
def await_serving(settings: Settings, url: str | None, version: str | None, timeout: float) -> None:
    """Wait until a running server answers /version with VERSION; exit 1 on timeout."""
    import httpx

    from serving.snapshots import check_version_name, read_current

    wanted = check_version_name(version) if version else read_current(settings.snapshots_dir)
    if wanted is None:
        raise UserFacingError(f"no CURRENT snapshot in {settings.snapshots_dir}")
    base = url or f"http://{settings.serve.host}:{settings.serve.port}"
    deadline = time.monotonic() + timeout
    seen: str = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{base}/version", timeout=2.0)
            if answer.status_code == 200:
                seen = str(answer.json().get("version"))
                if seen == wanted:
                    click.echo(f"{base} serves snapshot {wanted}")
                    return
            else:
                seen = f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            seen = type(exc).__name__
        time.sleep(0.2)
    raise UserFacingError(f"{base} did not serve {wanted} within {timeout:g}s (last: {seen})")


@click.command()
@click.option(
    "--user-id",
    required=True,
    help="The user's id: sent as an integer when it is one, unless --string-id.",
)
@click.option("--string-id", is_flag=True, help="Send the id as a string even if it is digits.")
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--url", default=None, help="Server base URL (default: http://serve.host:port).")
@click.pass_obj
def recommend(settings: Settings, user_id: str, string_id: bool, k: int, url: str | None) -> None:
    """Ask a running server for USER's top k and print them with titles from the catalogue."""
    import httpx
    import pyarrow.parquet as pq

    base = url or f"http://{settings.serve.host}:{settings.serve.port}"
    try:
        user: int | str = user_id if string_id or not user_id.isdigit() else int(user_id)
        answer = httpx.post(f"{base}/recommend", json={"user_id": user, "k": k}, timeout=30)
    except httpx.HTTPError as exc:
        raise UserFacingError(
            f"no server at {base} ({type(exc).__name__}): start `grank serve`"
        ) from exc
    if answer.status_code != 200:
        raise UserFacingError(f"{base} answered {answer.status_code}: {answer.text}")
    body = answer.json()
    items_path = settings.lake_layout().items_file
    titles: dict[int | str, str] = {}
    if items_path.is_file() and "title" in pq.read_schema(items_path).names:
        from common import idmap
        from features.ingest import idmaps_dir

        table = pq.read_table(items_path, columns=["item_id", "title"]).to_pydict()
        items = idmap.load(idmaps_dir(settings.lake_dir), "item")
        keys = items.to_external(table["item_id"]) if items else table["item_id"]
        titles = dict(zip(keys, table["title"], strict=True))
    kind = body.get("fallback_reason") or "personalised"
    click.echo(f"user {user_id}: {kind}, snapshot {body['snapshot_version']}")
    for rank, item in enumerate(body["items"], start=1):
        score = "" if item["score"] is None else f"{item['score']:8.3f}  "
        click.echo(f"{rank:3d}. {score}{item['item_id']:>7}  {titles.get(item['item_id'], '')}")
    timings = ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in body["timings_ms"].items())
    click.echo(f"timings: {timings}")


@click.command()
@click.option("--host", help="Bind address (default: serve.host, 127.0.0.1).")
@click.option("--port", type=int, help="Port (default: serve.port).")
@click.pass_obj
def serve(settings: Settings, host: str | None, port: int | None) -> None:
    """Run the recommendation API; it follows snapshots/CURRENT and swaps without downtime."""
    import uvicorn

    from features.ingest import idmaps_dir
    from serving.app import create_app
    from serving.sequences import FeastUserSource

    if not (settings.feast_dir / "feature_store.yaml").is_file():
        raise UserFacingError(
            f"no Feast repository at {settings.feast_dir}: run `grank features register` first"
        )
    config = settings.serve_config(idmaps_dir(settings.lake_dir))
    source = FeastUserSource(settings.feast_dir)
    app = create_app(config, source, source)
    uvicorn.run(
        app, host=host or settings.serve.host, port=port or settings.serve.port, log_level="info"
    )
