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
from grank.cli.options import DATE, echo_published
from grank.config import Settings


def embeddings_dir(settings: Settings, day: date) -> Path:
    """Where the refresh for ``day`` writes (and publish reads): ``embeddings/dt=D/``."""
    return settings.data_root / "embeddings" / f"dt={day.isoformat()}"


def published_checkpoint(settings: Settings) -> Path:
    """The checkpoint the evaluation gate published (``models/PUBLISHED`` names it)."""
    from training.evaluate import read_published

    name = read_published(settings.models_dir)
    if name is None:
        raise UserFacingError(
            f"no published model in {settings.models_dir}: run `grank train` and"
            " `grank evaluate` first (or pass --checkpoint)"
        )
    return settings.models_dir / "checkpoints" / name


def evaluation_metrics(settings: Settings, checkpoint: Path) -> dict[str, Any] | None:
    """The gate's evaluation report of ``checkpoint`` (``models/evaluations/<name>/``), if any."""
    path = settings.models_dir / "evaluations" / checkpoint.name / "metrics.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    return {"day": report.get("day"), "gate": report.get("gate"), "results": report.get("results")}


def _catalogue_and_popularity(settings: Settings, day: date) -> tuple[list[int], list[int]]:
    """Item ids of the lake's catalogue, and ids by popularity up to ``day`` (most first).

    Popularity comes from the ``item_features`` partition of ``day`` (7-day count, then
    all-time count), read as plain Parquet so no Spark is needed here.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    items_path = settings.lake_dir / "raw" / "items" / "items.parquet"
    if not items_path.is_file():
        raise UserFacingError(f"no item catalogue at {items_path}: run `grank data land` first")
    catalogue = pq.read_table(items_path, columns=["item_id"]).column("item_id").to_pylist()
    features_path = settings.features_dir / "item_features" / f"dt={day.isoformat()}"
    if not features_path.is_dir():
        raise UserFacingError(
            f"no item_features for {day} at {features_path}: run `grank features build` first"
        )
    table = pq.read_table(features_path, columns=["item_id", "pop_7d", "pop_total"])
    order = pc.sort_indices(
        table, sort_keys=[("pop_7d", "descending"), ("pop_total", "descending")]
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
    type=click.Path(path_type=Path, file_okay=False),
    help="Checkpoint folder (default: the published model, models/PUBLISHED).",
)
@click.pass_obj
def refresh(settings: Settings, day: date, checkpoint: Path | None) -> None:
    """Compute every catalogue item's vector into embeddings/dt=D/ (float32 + ids + weights)."""
    from serving.embeddings import refresh_embeddings

    catalogue, popular = _catalogue_and_popularity(settings, day)
    checkpoint = checkpoint or published_checkpoint(settings)
    report = refresh_embeddings(
        checkpoint,
        embeddings_dir(settings, day),
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
@click.pass_obj
def publish(settings: Settings, day: date, keep: int | None) -> None:
    """Publish embeddings/dt=D/ as a new verified version and point CURRENT at it."""
    from serving.sequences import GENERATOR_SERVICE, RANKER_SERVICE
    from serving.snapshots import publish_snapshot

    source = embeddings_dir(settings, day)
    if not source.is_dir():
        raise UserFacingError(
            f"no embeddings for {day} at {source}: run `grank embeddings refresh`"
        )
    version = publish_snapshot(
        settings.snapshots_dir,
        source,
        day,
        {"feature_services": [GENERATOR_SERVICE, RANKER_SERVICE], "dataset": settings.dataset},
        keep=keep or settings.serve.keep_snapshots,
    )
    click.echo(f"published snapshot {version}; CURRENT -> {version}")
    echo_published(
        {"logical_date": day, "version": version, "path": settings.snapshots_dir / version}
    )


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
    from serving.snapshots import read_current, verify_snapshot, version_dir

    version = version or read_current(settings.snapshots_dir)
    if version is None:
        raise UserFacingError(f"no CURRENT snapshot in {settings.snapshots_dir}")
    manifest = verify_snapshot(version_dir(settings.snapshots_dir, version))
    click.echo(f"snapshot {version} verified ({len(manifest['files'])} files)")


@snapshot.command()
@click.option("--to", "to", help="Version to restore (default: the one before CURRENT).")
@click.pass_obj
def rollback(settings: Settings, to: str | None) -> None:
    """Point CURRENT back at an earlier verified version; running servers follow."""
    from serving.snapshots import rollback as rollback_to

    click.echo(f"CURRENT -> {rollback_to(settings.snapshots_dir, to)}")


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
@click.option("--user-id", type=int, required=True)
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--url", default=None, help="Server base URL (default: http://serve.host:port).")
@click.pass_obj
def recommend(settings: Settings, user_id: int, k: int, url: str | None) -> None:
    """Ask a running server for USER's top k and print them with titles from the catalogue."""
    import httpx
    import pyarrow.parquet as pq

    base = url or f"http://{settings.serve.host}:{settings.serve.port}"
    try:
        answer = httpx.post(f"{base}/recommend", json={"user_id": user_id, "k": k}, timeout=30)
    except httpx.HTTPError as exc:
        raise UserFacingError(
            f"no server at {base} ({type(exc).__name__}): start `grank serve`"
        ) from exc
    if answer.status_code != 200:
        raise UserFacingError(f"{base} answered {answer.status_code}: {answer.text}")
    body = answer.json()
    items_path = settings.lake_dir / "raw" / "items" / "items.parquet"
    titles: dict[int, str] = {}
    if items_path.is_file():
        table = pq.read_table(items_path, columns=["item_id", "title"]).to_pydict()
        titles = dict(zip(table["item_id"], table["title"], strict=True))
    kind = "popular-items fallback (unknown user)" if body["fallback"] else "personalised"
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

    from serving.app import ServeConfig, create_app
    from serving.sequences import FeastSequenceSource

    if not (settings.feast_dir / "feature_store.yaml").is_file():
        raise UserFacingError(
            f"no Feast repository at {settings.feast_dir}: run `grank features register` first"
        )
    cfg = settings.serve
    config = ServeConfig(
        snapshots_dir=settings.snapshots_dir,
        device=cfg.device,
        bf16_screen=cfg.bf16_screen,
        k1=cfg.k1,
        max_k=cfg.max_k,
        filter_seen=cfg.filter_seen,
        max_batch=cfg.max_batch,
        max_wait_ms=cfg.max_wait_ms,
        max_queue=cfg.max_queue,
        poll_s=cfg.poll_s,
    )
    app = create_app(config, FeastSequenceSource(settings.feast_dir))
    uvicorn.run(app, host=host or cfg.host, port=port or cfg.port, log_level="info")
