"""The read-only HTTP lookup server other teams call (``grank features serve``).

Why not plain ``feast serve``: out of the box it also exposes ``/push``,
``/write-to-online-store`` and ``/materialize``, so any team that can look up features
could also overwrite them. This app exposes only the read endpoint and answers the write
endpoints with 403. Writes happen only through the daily ``grank features materialize``
run on the pipeline's side.

The read endpoint accepts what ``feast serve`` (Feast 0.67) accepts, so Feast's own
clients work unchanged, the stock ``FeatureStore`` with ``online_store: type: remote``
included: the same body model, unknown body fields ignored (newer clients add fields,
e.g. ``include_feature_view_version_metadata``), and a body without a Content-Type read as
JSON. It answers in the same response shape.

What it adds: limits (entities per request, body bytes; 413 beyond them, so one request
cannot hold a worker for seconds), and a one-line ``detail`` for every bad input (4xx,
never a 500): the server keeps serving. FastAPI is imported at module level (route
annotations must resolve at runtime); Feast only inside :func:`create_app`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from features.config import LookupLimits

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
    """Body of ``POST /get-online-features``: ``feast serve``'s ``GetOnlineFeaturesRequest``.

    Unknown fields are ignored, as there, so a newer Feast client keeps working. Entity
    ids are checked against each entity's declared type after parsing (:func:`_id_problem`).
    """

    model_config = ConfigDict(extra="ignore")

    entities: dict[str, list[Any]]
    feature_service: str | None = None
    features: list[str] = []
    full_feature_names: bool = False
    include_feature_view_version_metadata: bool = False


class BodyTooLarge(Exception):
    """The request body is over the configured limit (answered with 413)."""


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _validation_detail(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"invalid request body at {where}: {first['msg']}"


def _is_json(content_type: str | None) -> bool:
    """What FastAPI, hence ``feast serve``, parses as JSON: no header, or application/(*+)json."""
    if not content_type:
        return True
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _id_problem(key: str, ids: list[Any], python_type: type | None) -> str | None:
    """Why an id list does not fit its entity's type (``feast serve`` would fail on it)."""
    if python_type is None:
        return None
    for index, value in enumerate(ids):
        # bool is an int in Python, never an id
        if not isinstance(value, python_type) or isinstance(value, bool):
            kind = "an integer" if python_type is int else "a string"
            return (
                f"invalid request body at entities.{key}.{index}: each {key} must be"
                f" {kind}, got {value!r}"
            )
    return None


def _check_entities(
    lookup: LookupRequest, id_types: dict[str, type | None], max_entities: int
) -> tuple[int, str] | None:
    """(status, why) when the entity part of a request is unusable, or None when it is fine."""
    if not lookup.entities:
        return 400, 'entities is empty: give at least one id, e.g. {"user_id": [1]}'
    unknown = sorted(set(lookup.entities) - set(id_types))
    if unknown:
        return 400, f"unknown entity key(s) {unknown}; known keys: {sorted(id_types)}"
    lengths = {len(ids) for ids in lookup.entities.values()}
    if lengths == {0}:
        return 400, "entity id list is empty: give at least one id"
    if len(lengths) > 1:
        return 400, "entity id lists have different lengths"
    rows = lengths.pop()
    if rows > max_entities:
        return 413, (
            f"too many entities: {rows:,} in one request, the limit is {max_entities:,};"
            " split the ids over several requests"
        )
    for key, ids in lookup.entities.items():
        problem = _id_problem(key, ids, id_types[key])
        if problem:
            return 422, problem
    return None


def create_app(store: FeatureStore, limits: LookupLimits | None = None) -> FastAPI:
    """The lookup app over one open ``FeatureStore`` (sqlite or Redis online store)."""
    from feast.errors import FeastError, FeastObjectNotFoundException
    from feast.feature_server_utils import convert_response_to_dict
    from feast.value_type import ValueType

    limits = limits or LookupLimits()
    python_types = {ValueType.INT32: int, ValueType.INT64: int, ValueType.STRING: str}

    app = FastAPI(
        title="GRank feature lookups (read-only)",
        description=(
            "The read endpoint of `feast serve`, nothing else. Limits per request:"
            f" {limits.max_entities:,} entities, {limits.max_body_bytes:,} body bytes."
        ),
    )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "project": store.project}

    # The body is read by hand (size limit, Content-Type rules, one-line errors); the
    # schema is still published so that /docs shows it.
    body_schema = LookupRequest.model_json_schema()

    @app.post(
        "/get-online-features",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            }
        },
    )
    async def get_online_features(request: Request) -> Any:
        if not _is_json(request.headers.get("content-type")):
            return _error(415, "send the body as JSON (Content-Type: application/json)")
        try:
            body = await _read_body(request, limits.max_body_bytes)
        except BodyTooLarge:
            return _error(
                413, f"request body over {limits.max_body_bytes:,} bytes: split the request"
            )
        try:
            lookup = LookupRequest.model_validate_json(body)
        except ValidationError as exc:
            return _error(422, _validation_detail(exc))
        if (lookup.feature_service is None) == (not lookup.features):
            return _error(422, "give exactly one of feature_service or features")
        id_types = {
            entity.join_key: python_types.get(entity.value_type)
            for entity in store.list_entities(allow_cache=True)
        }
        problem = _check_entities(lookup, id_types, limits.max_entities)
        if problem:
            return _error(*problem)
        try:
            features: FeatureService | list[str] = lookup.features
            if lookup.feature_service is not None:
                features = store.get_feature_service(lookup.feature_service, allow_cache=True)
            response = await run_in_threadpool(
                store.get_online_features,
                features=features,
                entity_rows=dict(lookup.entities),
                full_feature_names=lookup.full_feature_names,
                include_feature_view_version_metadata=lookup.include_feature_view_version_metadata,
            )
        except FeastObjectNotFoundException as exc:
            return _error(404, str(exc).strip())
        except (FeastError, ValueError, KeyError) as exc:
            return _error(400, f"bad lookup: {str(exc).strip()}")
        return convert_response_to_dict(response.proto)

    async def refuse_write() -> JSONResponse:
        return _error(403, READ_ONLY_DETAIL)

    for path in WRITE_ENDPOINTS:
        app.add_api_route(
            path,
            refuse_write,
            methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            summary="Refused: this server is read-only (403)",
        )

    return app
