"""Training on real ML-100K features built by the Spark job: loss, determinism, CLI, gate, NaN.

One module-scoped fixture copies 11 days of the ML-100K lake and builds their
training_examples with the real Spark job (read-only afterwards); each CLI test gets its
own data root whose features/ and lake/ link to it, so models/ never leaks between tests.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from common.errors import UserFacingError
from features.lake import LakeLayout
from grank.cli import cli
from tests.conftest import TRAINING_LAST
from training.checkpoint import load_checkpoint
from training.data import leave_last_out, read_timelines
from training.evaluate import EvalConfig
from training.losses import LossWeights, grank_batch_loss
from training.model import GRank, GRankConfig
from training.registry import ModelRegistry
from training.train import FitConfig, fit

LAST = TRAINING_LAST
TINY_ENV = {
    "GRANK_TRAIN__DIM": "16",
    "GRANK_TRAIN__N_LAYERS": "1",
    "GRANK_TRAIN__BATCH_SIZE": "128",
    "GRANK_TRAIN__MAX_EPOCHS": "1",
    "GRANK_TRAIN__FINETUNE_MAX_EPOCHS": "1",
    "GRANK_TRAIN__CANDIDATES_PER_ROW": "32",
    "GRANK_TRAIN__K1": "50",
    "GRANK_FEATURES__SHORT_SEQ_LEN": "16",
    "GRANK_FEATURES__LONG_SEQ_LEN": "32",
    "GRANK_DATASET": "ml-100k",
    # the mechanics are under test here, not the model: a tiny model may pass the gate
    "GRANK_TRAIN__GATE__MIN_QUERIES": "1",
    "GRANK_TRAIN__GATE__BASELINE_MARGIN": "-1",
}


@pytest.fixture(scope="module")
def built_root(ml100k_training_root) -> Path:
    """A data root with ML-100K 1998-03-25..04-04 landed and its features built (read-only)."""
    return ml100k_training_root


def models_root(built_root: Path, tmp_path: Path) -> Path:
    """A writable data root that shares the built features and lake (symlinked)."""
    root = tmp_path / "root"
    root.mkdir()
    for name in ("features", "lake"):
        (root / name).symlink_to(built_root / name)
    return root


def tiny_grank(max_item_id: int, **overrides: float) -> GRank:
    """The small GRank these tests train (dim 16, one layer, short 16 / long 32)."""
    config = GRankConfig(
        n_item_rows=max_item_id + 1,
        dim=16,
        n_layers=1,
        short_seq_len=16,
        long_seq_len=32,
        dropout=0.1,
    )
    return GRank(replace(config, **overrides))


def grank(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI in-process like ``grank.cli.main``: a UserFacingError is one ``error:`` line."""
    result = CliRunner().invoke(cli, args, env=env)
    if isinstance(result.exception, UserFacingError):
        return 1, result.output + f"error: {result.exception}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def tiny_fit(
    built_root: Path,
    epochs: int,
    lr: float = 5e-3,
    plateau_lr_factor: float = 1.0,
    weight_average_decay: float = 0.0,
):
    """Two epochs of a tiny GRank on the last 4 days (~4.7k events) with leave-last-out."""
    timelines = read_timelines(built_root / "features", date(1998, 4, 1), LAST)
    train_end, validation, _ = leave_last_out(timelines)
    model = tiny_untrained_grank(timelines.max_item_id)
    loss = grank_batch_loss(
        LossWeights(sa=0.5, candidates=32, hard_negatives=0, ranker_in_batch=True), None
    )
    config = FitConfig(
        lr=lr,
        batch_size=128,
        max_epochs=epochs,
        patience=epochs,
        plateau_lr_factor=plateau_lr_factor,
        stride=16,
        val_metric="recall@10",
        next_day_windows=False,  # leave-last-out validation: the next item, not the next day
        weight_average_decay=weight_average_decay,
        progress=False,
    )
    result = fit(
        model,
        loss,
        timelines,
        train_end,
        validation,
        EvalConfig(16, 32, 50),
        config,
        torch.device("cpu"),
    )
    return model, result


def test_loss_decreases_and_training_is_deterministic(built_root):
    model, result = tiny_fit(built_root, epochs=2)
    losses = [h["loss"] for h in result.history]
    assert losses[1] < losses[0] - 0.1, losses
    again, _ = tiny_fit(built_root, epochs=2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def tiny_untrained_grank(max_item_id: int) -> GRank:
    torch.manual_seed(0)
    return tiny_grank(max_item_id, dropout=0.0)


def test_validation_scores_and_keeps_the_weight_average_without_changing_training(built_root):
    trained, plain = tiny_fit(built_root, epochs=2)
    # a decay of ~1: the average is the plain mean of the weights after every step
    averaged, result = tiny_fit(built_root, epochs=2, weight_average_decay=1 - 1e-7)
    assert [h["loss"] for h in result.history] == [h["loss"] for h in plain.history]
    assert result.history[0]["val_recall@10"] != plain.history[0]["val_recall@10"]
    initial = tiny_untrained_grank(averaged.config.n_item_rows - 1).state_dict()
    for name, tensor in averaged.state_dict().items():
        if tensor.is_floating_point() and not torch.equal(tensor, initial[name]):
            assert not torch.allclose(tensor, trained.state_dict()[name], atol=1e-6), name
    assert any(
        not torch.allclose(tensor, initial[name], atol=1e-3)
        for name, tensor in averaged.state_dict().items()
    )


def test_an_epoch_without_validation_gain_lowers_the_learning_rate(built_root):
    # at lr 1e-9 epoch 2 cannot change the ranking: no gain, so epoch 3 runs at half the lr
    _, result = tiny_fit(built_root, epochs=3, lr=1e-9, plateau_lr_factor=0.5)
    assert [h["lr"] for h in result.history] == [1e-9, 1e-9, 0.5e-9]
    assert result.best_epoch == 1


def test_nan_loss_stops_and_keeps_the_last_good_weights(built_root, tmp_path):
    calls = {"n": 0}

    def poison(loss_fn):
        def wrapped(*args):
            calls["n"] += 1
            loss, parts = loss_fn(*args)
            return (loss * float("nan") if calls["n"] > 1 else loss), parts

        return wrapped

    timelines = read_timelines(built_root / "features", None, LAST)
    train_end, validation, _ = leave_last_out(timelines)
    config = FitConfig(
        batch_size=100_000,
        max_epochs=5,
        patience=5,
        stride=16,
        val_metric="recall@10",
        next_day_windows=False,  # leave-last-out validation: the next item, not the next day
        progress=False,
    )
    spec = EvalConfig(16, 32, 50)
    loss = grank_batch_loss(
        LossWeights(sa=0.5, candidates=8, hard_negatives=0, ranker_in_batch=True), None
    )
    # one clean epoch (one step: the batch holds every window) is the last good state
    torch.manual_seed(0)
    good = tiny_grank(timelines.max_item_id)
    fit(
        good,
        loss,
        timelines,
        train_end,
        validation,
        spec,
        replace(config, max_epochs=1),
        torch.device("cpu"),
    )
    torch.manual_seed(0)
    model = tiny_grank(timelines.max_item_id)
    with pytest.raises(UserFacingError, match="non-finite loss at epoch 2 step 1"):
        fit(
            model, poison(loss), timelines, train_end, validation, spec, config, torch.device("cpu")
        )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, good.state_dict()[name]), name
        assert torch.isfinite(tensor).all()


def test_the_popularity_baseline_ranks_as_serving_answers_before_a_model_passes(built_root):
    """The baseline the gate compares against is the order serving falls back to, ties and
    all: recent count, then all-time count, then item id."""
    import numpy as np

    from grank.cli.serving import _catalogue_and_popularity
    from grank.cli.train import daily_job
    from tests.conftest import make_settings
    from training.data import day_number
    from training.features import read_feature_history
    from training.inputs import InputSpec

    settings = make_settings(built_root)
    _, served = _catalogue_and_popularity(settings, TRAINING_LAST)  # serves TRAINING_LAST + 1
    job = daily_job(settings, TRAINING_LAST + timedelta(days=1))
    history = read_feature_history(
        settings.features_dir,
        InputSpec(item_numeric=job.baselines.item_columns),
        job.test_day,
        job.test_day,
        max(served) + 1,
        settings.features.daily_ttl_days,
        torch.device("cpu"),
    )
    recent = job.baselines.scorers(history)[settings.train.recent_popularity_baseline]
    scores = recent.scores(np.array([day_number(job.test_day)]))
    in_table = set(served)
    ranked = [row for row in scores[0].argsort(descending=True).tolist() if row in in_table]
    assert len(served) > 100 and ranked == served


def test_cli_train_evaluate_warm_start_and_gate(built_root, tmp_path):
    root = models_root(built_root, tmp_path)
    env = {**TINY_ENV, "GRANK_DATA_ROOT": str(root)}
    registry = ModelRegistry(root / "models")
    code, out = grank(["train", "--date", "1998-04-03"], env)
    assert code == 0, out
    assert "from scratch (bootstrap)" in out
    first = registry.candidate(date(1998, 4, 3))
    _, manifest = load_checkpoint(registry.checkpoint_path(first))
    assert manifest["data_last_day"] == "1998-04-02" and manifest["warm_start_from"] is None
    assert manifest["config"]["n_item_rows"] == 1683  # the whole ML-100K catalogue has rows
    assert manifest["git_commit"] and manifest["bootstrap"]["validation_queries"] > 0
    # the bootstrap's validation chose the Ranker's weight that serving applies
    tried = manifest["ranker_weight_scores"]
    assert set(tried) == {"1", "0.75", "0.5", "0.25", "0"}
    best = max(tried.values())
    assert manifest["config"]["ranker_weight"] == max(float(w) for w in tried if tried[w] == best)
    # next-day windows train U as it serves: it reads the vector, no readout is chosen
    assert manifest["config"]["user_vector"] == "query" and manifest["user_vector_scores"] == {}
    # next-day evidence of the whole days between T_val and the test day: none here, T_val
    # falls on the last training day of this short window
    assert manifest["backtest"] == {}

    code, out = grank(["evaluate", "--date", "1998-04-03"], env)
    assert code == 0, out
    assert "popularity_7d" in out and "popularity_all_time" in out
    assert registry.published() == first
    evaluation = root / "models" / "evaluations" / "1998-04-03"
    assert (evaluation / "chart.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((evaluation / "metrics.json").read_text())
    assert report["gate"]["publishable"] and report["checkpoint"] == first
    assert report["gate"]["pooled_queries"] == report["n_queries"]

    # re-running a published day retrains from the same base (its lineage) to the same bytes
    code, out = grank(["train", "--date", "1998-04-03"], env)
    assert code == 0, out
    assert "from scratch" in out and registry.candidate(date(1998, 4, 3)) == first

    # the warm start trains all its epochs and keeps the last one's weights, whatever its
    # validation (a few single-item queries of the new day) reads
    two_epochs = {**env, "GRANK_TRAIN__FINETUNE_MAX_EPOCHS": "2", "GRANK_TRAIN__PATIENCE": "1"}
    code, out = grank(["train", "--date", "1998-04-04"], two_epochs)
    assert code == 0, out
    assert f"warm start from {first}" in out
    second = registry.candidate(date(1998, 4, 4))
    _, manifest = load_checkpoint(registry.checkpoint_path(second))
    assert manifest["data_first_day"] == "1998-03-25"  # the data the lineage has seen
    assert manifest["warm_start_from"] == first
    assert manifest["kept_epoch"] == len(manifest["history"]) == 2

    # a gate that wants more than this tiny model can give refuses it: exit 99, PUBLISHED stays
    strict = {**env, "GRANK_TRAIN__GATE__BASELINE_MARGIN": "0.5"}
    code, out = grank(["evaluate", "--date", "1998-04-04"], strict)
    assert code == 99, out
    assert "refused: not better than the best baseline" in out
    assert registry.published() == first
    # an old day re-run that passes the gate never moves PUBLISHED back
    code, out = grank(["evaluate", "--date", "1998-04-04"], env)
    assert code == 0 and registry.published() == second
    code, out = grank(["evaluate", "--date", "1998-04-03"], env)
    assert code == 0, out
    assert "PUBLISHED stays" in out and registry.published() == second


def test_a_warm_start_gives_items_new_to_the_catalogue_their_rows(built_root, tmp_path):
    """A team's catalogue grows: the day after a bootstrap lists an item no model has a row
    for. The warm start grows the item table, saves the grown model and the gate scores it
    (and the published model, grown the same way) on the day."""
    root = models_root(built_root, tmp_path)
    env = {**TINY_ENV, "GRANK_DATA_ROOT": str(root)}
    registry = ModelRegistry(root / "models")
    for command in ("train", "evaluate"):
        code, out = grank([command, "--date", "1998-04-03"], env)
        assert code == 0, out
    # the lake as it is the next day: the same events, one new row in the item dimension
    built, grown = LakeLayout(built_root / "lake"), LakeLayout(root / "lake")
    grown.root.unlink()
    grown.dimension_dir("items").mkdir(parents=True)
    for entry in built.root.iterdir():
        if entry != built.raw_dir:
            (grown.root / entry.name).symlink_to(entry)
    for entry in built.raw_dir.iterdir():
        if entry != built.dimension_dir("items"):
            (grown.raw_dir / entry.name).symlink_to(entry)
    items = pq.read_table(built.items_file)
    new_item = int(pc.max(items["item_id"]).as_py()) + 1
    row = {name: None for name in items.column_names} | {"item_id": new_item}
    pq.write_table(
        pa.concat_tables([items, pa.Table.from_pylist([row], items.schema)]), grown.items_file
    )

    code, out = grank(["train", "--date", "1998-04-04"], env)
    assert code == 0, out
    assert "warm start from" in out
    _, manifest = load_checkpoint(registry.checkpoint_path(registry.candidate(date(1998, 4, 4))))
    assert manifest["config"]["n_item_rows"] == new_item + 1
    code, out = grank(["evaluate", "--date", "1998-04-04"], env)
    assert code == 0, out
    assert registry.published() == registry.candidate(date(1998, 4, 4))


def test_the_bootstrap_walks_forward_as_the_daily_warm_starts_train(built_root, tmp_path):
    """Each day between T_val and the test day is fine-tuned as a warm start fine-tunes a
    day, so the gate's first evidence is about the model the daily runs would serve."""
    root = models_root(built_root, tmp_path)
    env = {
        **TINY_ENV,
        "GRANK_DATA_ROOT": str(root),
        "GRANK_TRAIN__VAL_QUANTILE": "0.6",  # T_val days before the test day
        "GRANK_TRAIN__FINETUNE_MAX_EPOCHS": "2",
    }
    code, out = grank(["train", "--date", "1998-04-04"], env)
    assert code == 0, out
    registry = ModelRegistry(root / "models")
    manifest = registry.manifest(registry.candidate(date(1998, 4, 4)))
    walked = manifest["bootstrap"]["walk_forward_epochs"]
    assert len(walked) >= 3 and set(walked) == {2}, walked
    # every whole day walked (but the test day) was scored before it was trained on
    assert len(set(manifest["backtest"]["day"])) == len(walked) - 1


def test_a_refused_bootstrap_is_continued_until_a_model_passes(built_root, tmp_path):
    """While nothing is published, the next day warm-starts from the refused candidate."""
    root = models_root(built_root, tmp_path)
    env = {**TINY_ENV, "GRANK_DATA_ROOT": str(root)}
    strict = {**env, "GRANK_TRAIN__GATE__BASELINE_MARGIN": "0.5"}
    registry = ModelRegistry(root / "models")
    assert grank(["train", "--date", "1998-04-03"], env)[0] == 0
    first = registry.candidate(date(1998, 4, 3))
    code, out = grank(["evaluate", "--date", "1998-04-03"], strict)
    assert code == 99 and registry.published() is None, out
    code, out = grank(["train", "--date", "1998-04-04"], env)
    assert code == 0 and f"warm start from {first}" in out, out
    second = registry.candidate(date(1998, 4, 4))
    assert registry.manifest(second)["warm_start_from"] == first
    # a re-run of the first day still starts from scratch: nothing came before it
    code, out = grank(["train", "--date", "1998-04-03"], env)
    assert code == 0 and "from scratch" in out and registry.candidate(date(1998, 4, 3)) == first
    # once a model passed, warm starts follow PUBLISHED again, never a refused candidate
    assert grank(["evaluate", "--date", "1998-04-03"], env)[0] == 0
    assert registry.published() == first
    assert registry.warm_start_base(date(1998, 4, 5)) == first


def test_bad_inputs_fail_with_one_clear_line(built_root, tmp_path):
    root = models_root(built_root, tmp_path)
    env = {**TINY_ENV, "GRANK_DATA_ROOT": str(root)}
    cases = [
        (["train", "--date", "1998-05-01"], "no training_examples for the test day 1998-05-01"),
        (["train", "--date", "1998-03-25"], "no training days before the test day"),
        (["evaluate", "--date", "1998-04-03"], "no trained model for 1998-04-03"),
    ]
    for args, message in cases:
        code, out = grank(args, env)
        assert code == 1 and f"error: {message}" in out, (args, out)
    (root / "models").mkdir()
    (root / "models" / "PUBLISHED").write_text("nowhere\n")
    code, out = grank(["train", "--date", "1998-04-03"], env)
    assert code == 1 and "not a checkpoint id" in out
    with pytest.raises(UserFacingError, match="no training_examples partitions"):
        read_timelines(tmp_path / "empty", None, LAST)


def test_gaps_are_refused_unless_the_lake_had_no_events_that_day(built_root, tmp_path):
    table = tmp_path / "features" / "training_examples"
    table.mkdir(parents=True)
    for day in ("1998-04-01", "1998-04-03"):
        source = built_root / "features" / "training_examples" / f"dt={day}"
        (table / f"dt={day}").symlink_to(source)
    first, last = date(1998, 4, 1), date(1998, 4, 3)
    with pytest.raises(UserFacingError, match=r"gaps in .*missing \[datetime.date\(1998, 4, 2\)"):
        read_timelines(tmp_path / "features", first, last)
    with pytest.raises(UserFacingError, match="gaps"):
        read_timelines(tmp_path / "features", first, last, frozenset({first, date(1998, 4, 2)}))
    timelines = read_timelines(tmp_path / "features", first, last, frozenset({first, last}))
    assert timelines.first_day == first
