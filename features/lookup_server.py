"""The read-only HTTP lookup server other teams call (``grank features serve``).

Why not plain ``feast serve``: out of the box it also exposes ``/push``,
``/write-to-online-store`` and ``/materialize``, so any team that can look up features
could also overwrite them. This app exposes only the read endpoint, with the request and
response shapes of ``feast serve``'s ``POST /get-online-features`` (clients written for
one work with the other), and answers the write endpoints with 403. Writes happen only
through the daily ``grank features materialize`` run on the pipeline's side.

Bad input gets a 4xx with a one-line ``detail``, never a 500: the server keeps serving.
FastAPI is imported at module level (route annotations must resolve at runtime); Feast
only inside :func:`create_app`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

# The write endpoints of `feast serve` (and its materialize variants): refused, not absent,
# so a client pointed here by mistake gets an answer that says why.
WRITE_ENDPOINTS: tuple[str, ...] = (
    "/push",
    "/write-to-online-store",
    "/materialize",
    "/materialize-incremental",
)
READ_ONLY_DETAIL = (
    "read-only lookup server: features are written only by the daily"
    " `grank features materialize` run"
)


class LookupRequest(BaseModel):
    """Body of ``POST /get-online-features`` (the ``feast serve`` shape; ids must be ints)."""

    model_config = ConfigDict(extra="forbid")

    entities: dict[str, list[StrictInt]]
    feature_service: str | None = None
    features: list[str] = []
    full_feature_names: StrictBool = False


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _validation_detail(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"invalid request body at {where}: {first['msg']}"


def _check_entities(lookup: LookupRequest, join_keys: set[str]) -> str | None:
    """Why the entity part of a request is unusable, or None when it is fine."""
    if not lookup.entities:
        return 'entities is empty: give at least one id, e.g. {"user_id": [1]}'
    unknown = sorted(set(lookup.entities) - join_keys)
    if unknown:
        return f"unknown entity key(s) {unknown}; known keys: {sorted(join_keys)}"
    lengths = {len(ids) for ids in lookup.entities.values()}
    if lengths == {0}:
        return "entity id list is empty: give at least one id"
    if len(lengths) > 1:
        return "entity id lists have different lengths"
    return None


def create_app(store: FeatureStore) -> FastAPI:
    """The lookup app over one open ``FeatureStore`` (sqlite or Redis online store)."""
    from feast.errors import FeastError, FeastObjectNotFoundException
    from feast.feature_server_utils import convert_response_to_dict

    app = FastAPI(
        title="GRank feature lookups (read-only)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "project": store.project}

    @app.post("/get-online-features")
    async def get_online_features(request: Request) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _error(415, "send the body as JSON with Content-Type: application/json")
        try:
            lookup = LookupRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return _error(422, _validation_detail(exc))
        if (lookup.feature_service is None) == (not lookup.features):
            return _error(422, "give exactly one of feature_service or features")
        join_keys = {entity.join_key for entity in store.list_entities(allow_cache=True)}
        problem = _check_entities(lookup, join_keys)
        if problem:
            return _error(400, problem)
        try:
            features: FeatureService | list[str] = lookup.features
            if lookup.feature_service is not None:
                features = store.get_feature_service(lookup.feature_service, allow_cache=True)
            response = await run_in_threadpool(
                store.get_online_features,
                features=features,
                entity_rows=dict(lookup.entities),
                full_feature_names=lookup.full_feature_names,
            )
        except FeastObjectNotFoundException as exc:
            return _error(404, str(exc).strip())
        except (FeastError, ValueError, KeyError) as exc:
            return _error(400, f"bad lookup: {str(exc).strip()}")
        return convert_response_to_dict(response.proto)

    async def refuse_write() -> JSONResponse:
        return _error(403, READ_ONLY_DETAIL)

    for path in WRITE_ENDPOINTS:
        app.add_api_route(path, refuse_write, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])

    return app
