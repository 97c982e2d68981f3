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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from serving.batcher import MicroBatcher, QueueFullError
from serving.config import ServeConfig
from serving.hotswap import SnapshotHolder
from serving.ids import ExternalIds, UnknownIdKindError
from serving.metrics import ServingMetrics
from serving.recommender import NotReadyError, Recommender, RecRequest, RecResult
from serving.sequences import ItemSource, UserSource

INT64_MAX = 2**63 - 1
log = logging.getLogger(__name__)


class RecommendRequest(BaseModel):
    """Body of POST /recommend; extra fields are refused so typos do not pass silently.

    The upper bound of ``k`` is configuration (``max_k``) and is checked by the handler.
    """

    model_config = ConfigDict(extra="forbid")
    # the dataset's own id: an integer, or a string where it was ingested with string ids
    user_id: (
        Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
        | Annotated[StrictStr, Field(min_length=1, max_length=1024)]
    )
    k: StrictInt = Field(default=10, ge=1)


class RecommendItem(BaseModel):
    item_id: int | str
    score: float | None


class RecommendResponse(BaseModel):
    user_id: int | str
    items: list[RecommendItem]
    snapshot_version: str
    fallback: bool
    fallback_reason: str | None = None
    batch_size: int
    timings_ms: dict[str, float]


def create_app(config: ServeConfig, source: UserSource, items: ItemSource | None = None) -> FastAPI:
    """Wire the parts; the snapshot watcher and the batcher start with the app's lifespan.

    Handlers find what they need on ``app.state``: ``config``, ``source`` (the user
    lookup), ``holder`` (the served snapshot), ``batcher`` and ``metrics``.
    """
    metrics = ServingMetrics()
    holder = SnapshotHolder(config.snapshots_dir, config.mips, metrics, config.poll_s, items)
    metrics.screen_rescans.set_function(lambda: _screen_rescans(holder))
    recommender = Recommender(holder.current, source, config.k1, config.filter_seen)
    batcher: MicroBatcher[RecRequest, RecResult] = MicroBatcher(
        recommender.recommend_batch,
        max_batch=config.max_batch,
        max_wait_s=config.max_wait_ms / 1e3,
        max_queue=config.max_queue,
        on_batch=metrics.batch_size.observe,
    )
    app = FastAPI(title="GRank index-free retrieval", lifespan=_lifespan)
    app.state.config = config
    app.state.source = source
    app.state.holder = holder
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.ids = ExternalIds(config.idmaps_dir)
    app.middleware("http")(_count_requests)
    app.include_router(router)
    return app


def _screen_rescans(holder: SnapshotHolder) -> float:
    """Queries the served snapshot's bf16 screen rescanned in float32 (0 without one)."""
    served = holder.current()
    return float(served.mips.screen_rescans) if served is not None and served.mips else 0.0


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    try:  # the first online lookup loads the registry (~0.3 s): not on a user's request
        await asyncio.to_thread(state.source.get, [0])
    except Exception:
        log.exception("feature store warm-up lookup failed; serving starts anyway")
    state.holder.start()
    await state.batcher.start()
    try:
        yield
    finally:
        await state.batcher.stop()
        state.holder.stop()


async def _count_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    # label by route template, never by raw path: unknown URLs must not add series
    endpoint = getattr(request.scope.get("route"), "path", "unmatched")
    metrics: ServingMetrics = request.app.state.metrics
    metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
    return response


def _unavailable(request: Request, detail: str) -> JSONResponse:
    """503 with the configured Retry-After: not ready, or too busy to queue the request."""
    config: ServeConfig = request.app.state.config
    return JSONResponse(
        {"detail": detail},
        status_code=503,
        headers={"Retry-After": str(config.retry_after_s)},
    )


router = APIRouter()


@router.post("/recommend", response_model=RecommendResponse)
async def recommend(body: RecommendRequest, request: Request) -> RecommendResponse | JSONResponse:
    started = time.perf_counter()
    state = request.app.state
    config: ServeConfig = state.config
    metrics: ServingMetrics = state.metrics
    if body.k > config.max_k:
        return JSONResponse(
            {"detail": f"k must be between 1 and {config.max_k}, got {body.k}"},
            status_code=422,
        )
    if state.holder.current() is None:
        return _unavailable(request, "no snapshot loaded yet")
    ids: ExternalIds = state.ids
    try:
        user = ids.user_dense(body.user_id)
    except UnknownIdKindError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)
    try:
        result: RecResult = await state.batcher.submit(RecRequest(user, body.k))
    except QueueFullError:
        metrics.rejected.inc()
        return _unavailable(request, "server busy: batch queue full")
    except NotReadyError:
        return _unavailable(request, "no snapshot loaded yet")
    total_ms = (time.perf_counter() - started) * 1e3
    timings = {**result.timings_ms, "total": total_ms}
    for stage, value in timings.items():
        metrics.stage_latency.labels(stage=stage).observe(value / 1e3)
    if result.fallback is not None:
        metrics.fallbacks.inc()
    return RecommendResponse(
        user_id=body.user_id,
        items=[
            RecommendItem(item_id=i, score=s)
            for i, s in zip(ids.items_external(result.items), result.scores, strict=True)
        ],
        snapshot_version=result.version,
        fallback=result.fallback is not None,
        fallback_reason=result.fallback,
        batch_size=result.batch_size,
        timings_ms=timings,
    )


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    snap = request.app.state.holder.current()
    if snap is None:
        return _unavailable(request, "no verified snapshot loaded")
    return JSONResponse({"status": "ready", "snapshot_version": snap.version})


@router.get("/version")
async def version(request: Request) -> Response:
    snap = request.app.state.holder.current()
    if snap is None:
        return _unavailable(request, "no verified snapshot loaded")
    keys = ("version", "logical_date", "created_at", "checkpoint_id", "item_count", "dim")
    return JSONResponse({key: snap.manifest.get(key) for key in keys})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    metrics: ServingMetrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
