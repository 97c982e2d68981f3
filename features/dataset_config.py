"""The dataset config: how a team's event export maps onto the raw lake (docs/ingestion.md).

One YAML or TOML file names the event columns, how timestamps are written (a number in
a unit, or text in a format and time zone), which source event types exist and which
lake event type each becomes, how event types (and values) map to the behaviour types
the model reads, the value range the raw quality gate enforces, whether ids are used as
given (``dense``) or go through the lake's id maps (``string`` / ``int64``), and the
item and user dimension files with their attribute columns. Every field is validated
(pydantic), and a bad file is refused with one line per bad field.

The MovieLens replays are two such configs (``features/datasets/ml-1m.toml`` and
``ml-100k.toml``) over the same ingestion path as any export.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import UserFacingError
from features.config import ACTIVITY, POPULARITY

BUILTIN_DIR = Path(__file__).resolve().parent / "datasets"
# where the lake keeps the config it was ingested with (later steps read it from there)
LAKE_CONFIG = "dataset.json"

AttributeType = Literal["string", "int32", "int64", "float32", "float64", "bool"]
TimeUnit = Literal["s", "ms", "us", "ns"]
FileFormat = Literal["parquet", "csv", "jsonl"]
IdKind = Literal["dense", "string", "int64"]
# a window count column of the feature tables, of any window (``pop_7d``, ``events_14d``)
_WINDOW_COLUMN = re.compile(rf"^(?:{POPULARITY}|{ACTIVITY})_\d+d$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventColumns(_Strict):
    """Source column names; optional ones may be left out."""

    user_id: str
    item_id: str
    timestamp: str
    value: str | None = None
    event_type: str | None = None
    # a unique id per event (the tie-break of equal timestamps); assigned when absent
    event_id: str | None = None


class TimestampSpec(_Strict):
    """Numbers in ``unit`` since the epoch, or text parsed with ``format`` (strptime)."""

    unit: TimeUnit | None = None
    format: str | None = None
    # the zone of local wall-clock times (text without an offset, naive Parquet timestamps)
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _one_of(self) -> TimestampSpec:
        if self.unit is not None and self.format is not None:
            raise ValueError("give either unit (numbers) or format (text), not both")
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


class EventsSpec(_Strict):
    """Where the events are and how to read them."""

    # paths, globs or fsspec URLs; relative ones are relative to the config file;
    # ``{data_root}`` stands for the configured data root. The CLI may pass others.
    paths: tuple[str, ...] = ()
    format: FileFormat | None = None  # default: from each file's suffix
    columns: EventColumns
    timestamp: TimestampSpec = Field(default_factory=TimestampSpec)
    # source event type -> lake event type; events of other types are refused
    types: dict[str, str] = Field(default_factory=dict)
    # the lake event type of every event when there is no event type column
    default_type: str | None = None
    csv_delimiter: str = ","

    @model_validator(mode="after")
    def _types_given(self) -> EventsSpec:
        if self.columns.event_type is None and self.default_type is None:
            raise ValueError("without columns.event_type, default_type names every event's type")
        if self.columns.event_type is not None and not self.types:
            raise ValueError("columns.event_type needs types: source type -> lake event type")
        if len(self.csv_delimiter) != 1:
            raise ValueError("csv_delimiter must be one character")
        return self

    @property
    def lake_types(self) -> tuple[str, ...]:
        """The event types the lake may hold, sorted."""
        found = set(self.types.values())
        if self.default_type is not None:
            found.add(self.default_type)
        return tuple(sorted(found))


class ValueRange(_Strict):
    """The range of ``value`` the raw quality gate accepts (both bounds inclusive)."""

    min: float = 0.0
    max: float = 5.0

    @model_validator(mode="after")
    def _ordered(self) -> ValueRange:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class IdSpec(_Strict):
    """``dense``: positive integers used as the model's ids as given; ``string`` / ``int64``:
    translated through the lake's append-only id map (dense ids from 1, 0 = padding)."""

    user: IdKind = "string"
    item: IdKind = "string"


class Behavior(_Strict):
    """A behaviour type the model can read: events of these types with a value in range."""

    name: str = Field(min_length=1)
    event_types: tuple[str, ...] = ()
    min_value: float | None = None
    max_value: float | None = None


class DimensionSpec(_Strict):
    """An item or user dimension file: its id column and attribute columns with types."""

    path: str | None = None
    format: FileFormat | None = None
    id_column: str
    # attribute -> type, in the order the feature tables get them; source column = name
    attributes: dict[str, AttributeType] = Field(default_factory=dict)

    @field_validator("attributes")
    @classmethod
    def _free_names(cls, value: dict[str, str]) -> dict[str, str]:
        # the feature tables' own columns (docs/architecture.md, Contract 2), and the counts
        # of every window: the windows are a setting, and a config is validated without it
        reserved = {
            *("user_id", "item_id", "event_timestamp", "created", "dt", "first_seen_ts"),
            *("events_total", "mean_value", "tenure_days", "pop_total", "age_days"),
        }
        clash = sorted(n for n in value if n in reserved or _WINDOW_COLUMN.match(n))
        if clash:
            raise ValueError(f"attribute names {clash} are reserved by the feature tables")
        return value


class DatasetConfig(_Strict):
    """The whole config file (docs/ingestion.md explains each field)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    events: EventsSpec
    values: ValueRange = Field(default_factory=ValueRange)
    ids: IdSpec = Field(default_factory=IdSpec)
    behaviors: tuple[Behavior, ...] = ()
    items: DimensionSpec | None = None
    users: DimensionSpec | None = None

    @model_validator(mode="after")
    def _behaviors_known(self) -> DatasetConfig:
        known = set(self.events.lake_types)
        for rule in self.behaviors:
            unknown = sorted(set(rule.event_types) - known)
            if unknown:
                raise ValueError(
                    f"behavior {rule.name!r} names event types {unknown} that no event has"
                    f" (known: {sorted(known)})"
                )
        return self

    @property
    def user_attributes(self) -> dict[str, str]:
        return dict(self.users.attributes) if self.users else {}

    @property
    def item_attributes(self) -> dict[str, str]:
        return dict(self.items.attributes) if self.items else {}


def parse(values: Any, source: str) -> DatasetConfig:
    """Validate parsed YAML/TOML; every bad field becomes one line of the error."""
    if not isinstance(values, dict):
        raise UserFacingError(f"dataset config {source} must be a mapping at the top level")
    try:
        return DatasetConfig.model_validate(values)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in error['loc']) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        ]
        raise UserFacingError(
            f"dataset config {source} has {len(lines)} bad field(s):\n" + "\n".join(lines)
        ) from None


def load(path: Path) -> DatasetConfig:
    """Read and validate a ``.toml``, ``.yaml``/``.yml`` or ``.json`` dataset config."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserFacingError(f"cannot read dataset config {path}: {exc}") from exc
    try:
        if path.suffix == ".toml":
            values: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text)
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise UserFacingError(f"dataset config {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserFacingError(f"dataset config {path} is not valid: {exc}") from exc
    return parse(values, str(path))


def builtin(name: str) -> Path:
    """The shipped config of a named dataset (``features/datasets/<name>.toml``)."""
    path = BUILTIN_DIR / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))
        raise UserFacingError(f"no shipped dataset config {name!r}; known: {', '.join(known)}")
    return path


def save_to_lake(lake_dir: Path, config: DatasetConfig) -> None:
    """Keep the config beside the lake: later steps (gates, features, Feast) read it there."""
    from common.atomic import atomic_write_text

    atomic_write_text(lake_dir / LAKE_CONFIG, config.model_dump_json(indent=2) + "\n")


def for_lake(lake_dir: Path, fallback: str) -> DatasetConfig:
    """The config the lake was ingested with, or the shipped config ``fallback`` for lakes
    landed without one (synthetic lakes, older replays)."""
    stored = lake_dir / LAKE_CONFIG
    if stored.exists():
        return load(stored)
    return load(builtin(fallback))
