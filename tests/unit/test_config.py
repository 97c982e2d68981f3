"""Layer-owned knobs composed at the edge: one default per knob, every env name still works.

docs/architecture.md ("Configuration"): each layer's config class defines its knobs and
their defaults; ``grank/config.py`` exposes them as settings and builds the layers'
values back. No Spark, no data: milliseconds.
"""

from __future__ import annotations

import sys
from dataclasses import fields, replace
from datetime import date
from pathlib import Path

import pytest
from pydantic import ValidationError

from features.config import BuildConfig, LookupLimits, QualityConfig, SparkConfig, StoreConfig
from grank.cli import main
from grank.cli.train import daily_job, offline_job
from grank.config import Settings
from serving.config import ServeConfig
from training.config import EvalConfig, FitConfig, GRankConfig, LossWeights
from training.inputs import InputSpec, select_groups


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GRANK_ variable of the calling shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("GRANK_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_settings_defaults_are_the_layers_defaults(clean_env, tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path)
    features, train = settings.features, settings.train
    assert settings.fit_config(bf16=False) == FitConfig(
        stride=features.short_seq_len, max_seconds=train.max_minutes * 60
    )
    assert settings.finetune_config(bf16=False) == replace(
        settings.fit_config(bf16=False),
        lr=train.finetune_lr,
        max_epochs=train.finetune_max_epochs,
        max_seconds=None,
        # a warm start trains every epoch and ends on the last: no choice on its thin validation
        keep_best=False,
        patience=train.finetune_max_epochs + 1,
        # a handful of steps a day: an average over them would barely leave the base
        weight_average_decay=0.0,
    )
    assert settings.loss_weights() == LossWeights(hard_pool=EvalConfig.k1)
    inputs = InputSpec(item_numeric=("pop_7d",))
    # the one knob whose layer default differs: GRankConfig's False is what a checkpoint
    # written before the option means
    assert settings.grank_config(inputs) == GRankConfig(
        n_item_rows=2,
        short_seq_len=features.short_seq_len,
        long_seq_len=features.long_seq_len,
        ranker_residual=True,
        inputs=inputs,
    )
    # without next-day windows U is one next-token slot of 65: the newest slot reads
    without = settings.model_copy(
        update={"train": settings.train.model_copy(update={"next_day_windows": False})}
    )
    assert without.grank_config(inputs).user_vector == "newest"
    # ...and validation chooses among the places (ties keep it); with windows, U serves
    assert without.fit_config(bf16=False).user_vectors == ("newest", "query", "both")
    assert settings.fit_config(bf16=False).user_vectors == ()
    assert settings.eval_config() == EvalConfig(
        features.short_seq_len, features.long_seq_len, seen_len=features.long_seq_len
    )
    assert settings.serve_config(None) == ServeConfig(snapshots_dir=tmp_path / "snapshots")
    assert settings.spark_config() == SparkConfig()
    assert settings.build_config() == BuildConfig()
    assert settings.quality_config() == QualityConfig()
    assert settings.store_config() == StoreConfig(repo_dir=tmp_path / "feast")
    assert settings.lookup_limits() == LookupLimits()


def test_the_model_reads_the_user_profile_by_default(clean_env, tmp_path: Path) -> None:
    """The groups that led on next-day N@10 (docs/benchmarks.md, "The feature groups"): the
    user profile; not the item features, which ordered the top 10 worse."""
    train = Settings(data_root=tmp_path).train
    chosen = select_groups(train.inputs, train.feature_groups)
    profile = ("events_7d", "events_30d", "events_total", "mean_value", "tenure_days")
    assert chosen.user_numeric == profile
    assert chosen.item_numeric == () and chosen.behaviors == ()


@pytest.mark.parametrize(
    ("layer", "section", "renamed"),
    [
        (SparkConfig, "spark", {}),
        (BuildConfig, "features", {"windows_days": "popularity_windows_days"}),
        (QualityConfig, "quality", {}),
        (StoreConfig, "feast", {}),
        (
            LookupLimits,
            "feast",
            {"max_entities": "server_max_entities", "max_body_bytes": "server_max_body_bytes"},
        ),
    ],
)
def test_every_features_knob_is_a_setting_with_the_layers_default(
    clean_env, tmp_path: Path, layer: type, section: str, renamed: dict[str, str]
) -> None:
    """A knob added to a features config class without its setting (or a default edited on
    one side only) fails here: the settings section names each field, with its default."""
    settings = getattr(Settings(data_root=tmp_path), section)
    for knob in fields(layer):
        if knob.name == "repo_dir":  # a derived location (Settings.feast_dir), not a knob
            continue
        name = renamed.get(knob.name, knob.name)
        assert name in type(settings).model_fields, f"{layer.__name__}.{knob.name}: no setting"
        assert getattr(settings, name) == knob.default, f"{section}.{name}: another default"


def test_every_env_name_reaches_the_layer_that_takes_it(clean_env, tmp_path: Path) -> None:
    values = {
        "GRANK_TRAIN__DIM": "32",
        "GRANK_TRAIN__DROPOUT": "0.05",
        "GRANK_TRAIN__BATCH_SIZE": "7",
        "GRANK_TRAIN__VAL_METRIC": "recall@50",
        "GRANK_TRAIN__MAX_MINUTES": "0",
        "GRANK_TRAIN__FINETUNE_LR": "0.002",
        "GRANK_TRAIN__LAMBDA_SA": "0.3",
        "GRANK_TRAIN__RANKER_HARD_NEGATIVES": "4",
        "GRANK_TRAIN__K1": "50",
        "GRANK_TRAIN__GATE__BASELINE_MARGIN": "-0.5",
        "GRANK_TRAIN__RECENT_POPULARITY_DAYS": "14",
        "GRANK_TRAIN__VAL_TARGETS": "4",
        "GRANK_FEATURES__SHORT_SEQ_LEN": "16",
        "GRANK_FEATURES__POPULARITY_WINDOWS_DAYS": "[1, 14]",
        "GRANK_FEATURES__KEEP_STATE_DAYS": "3",
        "GRANK_SPARK__MASTER": "spark://spark-master:7077",
        "GRANK_SPARK__EXECUTOR_MEMORY": "2g",
        "GRANK_QUALITY__VOLUME_LOW_RATIO": "0.5",
        "GRANK_QUALITY__MAX_USER_EVENTS": "99",
        "GRANK_FEAST__ONLINE_STORE": "redis",
        "GRANK_FEAST__REGISTRY_CACHE_TTL_SECONDS": "5",
        "GRANK_FEAST__SERVER_MAX_ENTITIES": "12",
        "GRANK_SERVE__MAX_BATCH": "9",
        "GRANK_SERVE__DEVICE": "cpu",
    }
    for name, value in values.items():
        clean_env.setenv(name, value)
    settings = Settings(data_root=tmp_path)
    model = settings.grank_config(InputSpec())
    assert (model.dim, model.dropout, model.short_seq_len) == (32, 0.05, 16)
    fit = settings.fit_config(bf16=True)
    assert (fit.batch_size, fit.val_metric, fit.max_seconds, fit.stride, fit.bf16) == (
        7,
        "recall@50",
        None,
        16,
        True,
    )
    finetune = settings.finetune_config(bf16=True)
    assert (finetune.lr, finetune.batch_size) == (0.002, 7)
    weights = settings.loss_weights()
    assert (weights.sa, weights.hard_negatives, weights.hard_pool) == (0.3, 4, 50)
    assert settings.eval_config().k1 == 50
    assert settings.train.gate.baseline_margin == -0.5
    assert daily_job(settings, date(2000, 1, 1)).val_targets == 4
    assert offline_job(settings, 0.9, None, False).val_targets == 4
    # the model's default inputs are the columns of the configured windows
    assert settings.train.inputs == InputSpec(
        user_numeric=("events_14d", "events_total", "mean_value", "tenure_days"),
        item_numeric=("pop_1d", "pop_14d", "pop_total", "age_days"),
    )
    serve = settings.serve_config(None)
    assert (serve.max_batch, serve.device, serve.mips.device) == (9, "cpu", "cpu")
    spark = settings.spark_config()
    assert (spark.master, spark.executor_memory) == ("spark://spark-master:7077", "2g")
    build = settings.build_config()
    assert (build.short_seq_len, build.windows_days, build.keep_state_days) == (16, (1, 14), 3)
    quality = settings.quality_config()
    assert (quality.volume_low_ratio, quality.max_user_events) == (0.5, 99)
    store = settings.store_config()
    assert (store.online_store, store.registry_cache_ttl_seconds) == ("redis", 5)
    assert settings.lookup_limits().max_entities == 12


def cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a cheap CLI command under the current environment; the one error line it exits 1 with."""
    monkeypatch.setattr(sys, "argv", ["grank", "data", "landed", "--date", "2000-01-01"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    # the exit holds no reference to the failed command (its frames, its Arrow objects)
    assert exited.value.__context__ is None
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    return line


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        (
            "GRANK_FEATURES__POPULARITY_WINDOWS_DAYS",
            "[1, 14]",
            "recent_popularity_days=7 is not one of the popularity windows (1, 14)"
            " (GRANK_FEATURES__POPULARITY_WINDOWS_DAYS)",
        ),
        (
            "GRANK_TRAIN__RANKER_HARD_NEGATIVES",
            "0",
            "the Ranker learns from hard negatives only (ranker_in_batch_negatives is false):"
            " ranker_hard_negatives must be at least 1",
        ),
    ],
)
def test_training_settings_that_cannot_train_are_refused_at_load(
    clean_env,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    error: str,
) -> None:
    clean_env.setenv(name, value)
    assert cli_error(monkeypatch, capsys) == f"error: GRANK_TRAIN: {error}"


def test_a_ranker_with_in_batch_negatives_may_draw_no_hard_ones(clean_env) -> None:
    clean_env.setenv("GRANK_TRAIN__RANKER_HARD_NEGATIVES", "0")
    clean_env.setenv("GRANK_TRAIN__RANKER_IN_BATCH_NEGATIVES", "true")
    assert Settings().loss_weights().hard_negatives == 0


def test_a_file_url_and_a_plain_path_name_the_same_data_root(clean_env, tmp_path: Path) -> None:
    plain = Settings(data_root=str(tmp_path))
    for url in (tmp_path.as_uri(), f"file://localhost{tmp_path}/"):
        settings = Settings(data_root=url)
        assert settings.data_root == plain.data_root == tmp_path, url
        assert settings.lake_layout() == plain.lake_layout()
        assert settings.feature_tables() == plain.feature_tables()
    clean_env.setenv("GRANK_DATA_ROOT", tmp_path.as_uri())
    assert Settings().features_dir == plain.features_dir


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("s3a://bucket/grank", "s3a://"),
        ("gs://bucket/grank", "gs://"),
        ("file://otherhost/shared/grank", "the host 'otherhost'"),
    ],
)
def test_a_data_root_without_rename_or_not_the_same_path_everywhere_is_refused(
    clean_env, value: str, named: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(data_root=value)
    assert named in str(refused.value)
    assert "shared POSIX filesystem" in str(refused.value)
    assert "atomic renames" in str(refused.value)


def test_the_cli_refuses_an_object_store_data_root_in_one_line(
    clean_env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("GRANK_DATA_ROOT", "s3a://bucket/grank")
    line = cli_error(monkeypatch, capsys)
    assert line.startswith("error: GRANK_DATA_ROOT: s3a:// is not supported: the data root")
