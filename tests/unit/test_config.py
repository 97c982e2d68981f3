"""Layer-owned knobs composed at the edge: one default per knob, every env name still works.

docs/architecture.md ("Configuration"): each layer's config class defines its knobs and
their defaults; ``grank/config.py`` exposes them as settings and builds the layers'
values back. No Spark, no data: milliseconds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from grank.config import Settings
from serving.config import ServeConfig
from training.config import EvalConfig, FitConfig, GRankConfig, LossWeights
from training.inputs import InputSpec


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
    assert settings.eval_config() == EvalConfig(
        features.short_seq_len, features.long_seq_len, seen_len=features.long_seq_len
    )
    assert settings.serve_config(None) == ServeConfig(snapshots_dir=tmp_path / "snapshots")


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
        "GRANK_FEATURES__SHORT_SEQ_LEN": "16",
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
    serve = settings.serve_config(None)
    assert (serve.max_batch, serve.device, serve.mips.device) == (9, "cpu", "cpu")
