"""The FastAPI serving app: /recommend, /health, /ready, /metrics, /version.

Requests are validated by pydantic (wrong types, out-of-range k: 422, never 500), then
queued for the micro-batcher, which scores them in batches against the current snapshot.
Readiness means "a verified snapshot is loaded", so a load balancer never routes to an
instance that would answer from nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from serving.batcher import MicroBatcher, QueueFullError
from serving.hotswap import SnapshotHolder
from serving.metrics import ServingMetrics
from serving.mips import Device, MipsOptions, ScreenMode
from serving.recommender import NotReadyError, Recommender, RecRequest, RecResult
from serving.sequences import ItemSource, UserSource

INT64_MAX = 2**63 - 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Plain serving knobs (the CLI fills them from ``ServeSettings``)."""

    snapshots_dir: Path
    device: Device = "auto"
    bf16_screen: ScreenMode = "auto"
    k1: int = 200
    max_k: int = 100
    filter_seen: bool = True
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 256
    poll_s: float = 0.1
    retry_after_s: int = 1


class RecommendRequest(BaseModel):
    """Body of POST /recommend; extra fields are refused so typos do not pass silently.

    The upper bound of ``k`` is configuration (``max_k``) and is checked by the handler.
    """

    model_config = ConfigDict(extra="forbid")
    user_id: StrictInt = Field(ge=0, le=INT64_MAX)
    k: StrictInt = Field(default=10, ge=1)


class RecommendItem(BaseModel):
    item_id: int
    score: float | None


class RecommendResponse(BaseModel):
    user_id: int
    items: list[RecommendItem]
    snapshot_version: str
    fallback: bool
    fallback_reason: str | None = None
    batch_size: int
    timings_ms: dict[str, float]


def create_app(config: ServeConfig, source: UserSource, items: ItemSource | None = None) -> FastAPI:
    """Build the app; the snapshot watcher and the batcher start with the app's lifespan."""
    metrics = ServingMetrics()
    mips = MipsOptions(config.device, config.bf16_screen)
    holder = SnapshotHolder(config.snapshots_dir, mips, metrics, config.poll_s, items)
    metrics.screen_rescans.set_function(
        lambda: (
            float(served.mips.screen_rescans)
            if (served := holder.current()) and served.mips
            else 0.0
        )
    )
    recommender = Recommender(holder.current, source, config.k1, config.filter_seen)

    def process(requests: Sequence[RecRequest]) -> list[RecResult]:
        return recommender.recommend_batch(requests)

    batcher: MicroBatcher[RecRequest, RecResult] = MicroBatcher(
        process,
        max_batch=config.max_batch,
        max_wait_s=config.max_wait_ms / 1e3,
        max_queue=config.max_queue,
        on_batch=metrics.batch_size.observe,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # the first online lookup loads the registry (~0.3 s): not on a user's request
            await asyncio.to_thread(source.get, [0])
        except Exception:
            log.exception("feature store warm-up lookup failed; serving starts anyway")
        holder.start()
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            holder.stop()

    app = FastAPI(title="GRank index-free retrieval", lifespan=lifespan)
    app.state.holder = holder
    app.state.metrics = metrics

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        # label by route template, never by raw path: unknown URLs must not add series
        endpoint = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    def unavailable(detail: str) -> JSONResponse:
        return JSONResponse(
            {"detail": detail},
            status_code=503,
            headers={"Retry-After": str(config.retry_after_s)},
        )

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest) -> RecommendResponse | JSONResponse:
        started = time.perf_counter()
        if body.k > config.max_k:
            return JSONResponse(
                {"detail": f"k must be between 1 and {config.max_k}, got {body.k}"},
                status_code=422,
            )
        if holder.current() is None:
            return unavailable("no snapshot loaded yet")
        try:
            result = await batcher.submit(RecRequest(body.user_id, body.k))
        except QueueFullError:
            metrics.rejected.inc()
            return unavailable("server busy: batch queue full")
        except NotReadyError:
            return unavailable("no snapshot loaded yet")
        total_ms = (time.perf_counter() - started) * 1e3
        timings = {**result.timings_ms, "total": total_ms}
        for stage, value in timings.items():
            metrics.stage_latency.labels(stage=stage).observe(value / 1e3)
        if result.fallback is not None:
            metrics.fallbacks.inc()
        return RecommendResponse(
            user_id=result.user_id,
            items=[
                RecommendItem(item_id=i, score=s)
                for i, s in zip(result.items, result.scores, strict=True)
            ],
            snapshot_version=result.version,
            fallback=result.fallback is not None,
            fallback_reason=result.fallback,
            batch_size=result.batch_size,
            timings_ms=timings,
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        snap = holder.current()
        if snap is None:
            return unavailable("no verified snapshot loaded")
        return JSONResponse({"status": "ready", "snapshot_version": snap.version})

    @app.get("/version")
    async def version() -> Response:
        snap = holder.current()
        if snap is None:
            return unavailable("no verified snapshot loaded")
        keys = ("version", "logical_date", "created_at", "checkpoint_id", "item_count", "dim")
        return JSONResponse({key: snap.manifest.get(key) for key in keys})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
