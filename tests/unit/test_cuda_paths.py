"""The CUDA paths: serving's exact MIPS, the popularity baseline and a training run on the GPU.

Skipped where no CUDA device is present (CI's machines have none); run on a GPU machine
with `python -m pytest tests/unit/test_cuda_paths.py`. The CPU paths have their own tests.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
import torch

from serving.mips import MipsConfig, TorchMIPS, build_mips
from training.baselines import Baselines
from training.config import EvalConfig, FitConfig
from training.data import Timelines, leave_last_out
from training.evaluate import EvalInputs, rankings
from training.features import FeatureHistory
from training.inputs import InputSpec
from training.losses import LossWeights, grank_batch_loss
from training.model import GRank, GRankConfig
from training.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_auto_picks_the_gpu_and_returns_the_exact_top_k():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((200_000, 64), dtype=np.float32)
    queries = rng.standard_normal((64, 64), dtype=np.float32)
    on_gpu = build_mips(matrix, MipsConfig(device="auto"))
    assert isinstance(on_gpu, TorchMIPS)
    scores, rows = on_gpu.search(queries, 100)
    exact = queries.astype(np.float64) @ matrix.T.astype(np.float64)
    expected = -np.sort(-exact, axis=1)[:, :100]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(exact, rows, 1), expected, rtol=1e-5, atol=1e-4)


def _walks(n_users: int, length: int, n_items: int) -> Timelines:
    """Users walk the catalogue in steps of one from random starts, one event a minute."""
    starts = np.random.default_rng(0).integers(1, n_items + 1, n_users)
    items = ((starts[:, None] + np.arange(length)) - 1) % n_items + 1
    return Timelines(
        user_ids=np.arange(n_users),
        offsets=np.arange(0, n_users * length + 1, length),
        items=items.ravel(),
        times=np.tile(np.arange(length, dtype=np.int64) * 60_000_000, n_users),
        first_target=np.zeros(n_users, dtype=np.int64),
        first_day=date(2000, 1, 1),
        last_day=date(2000, 1, 1),
    )


def popularity_rankings(device: torch.device) -> np.ndarray:
    """The last-week popularity baseline's top items for 300 queries, ranked on ``device``
    over 400 items whose counts tie in a few levels.

    The catalogue is twice the ranking's depth, so every rank holds an item the user has
    not seen: the seen ones score -inf, and their order among themselves serves no one.
    """
    n_items = 400
    timelines = _walks(300, 24, n_items)
    _, _, test = leave_last_out(timelines)
    rng = np.random.default_rng(1)
    counts = np.zeros((2, n_items + 1, 2), np.float32)  # [as-of day, item row, column]
    counts[1, 1:, 0] = rng.integers(0, 5, n_items)  # pop_7d
    counts[1, 1:, 1] = rng.integers(0, 3, n_items)  # pop_total
    history = FeatureHistory(
        spec=InputSpec(item_numeric=("pop_7d", "pop_total")),
        first_day=int(test.days.min()) - 1,  # the queries' days read as-of slot 1
        user_ids=np.zeros(0, dtype=np.int64),
        user_numeric=np.zeros((2, 1, 0), np.float32),
        user_categorical=np.zeros((2, 1, 0), np.int64),
        item_table=torch.as_tensor(counts, device=device),
    )
    scorer = Baselines({"popularity_7d": "pop_7d"}).scorers(history)["popularity_7d"]
    spec = EvalConfig(16, 32, k1=50)
    return rankings(scorer, timelines, test, spec, device, EvalInputs(history))["generator"]


def test_the_popularity_baseline_ranks_ties_on_the_gpu_as_on_the_cpu():
    """The gate's baseline must not depend on the device's top-k order of equal counts."""
    cpu = popularity_rankings(torch.device("cpu"))
    np.testing.assert_array_equal(popularity_rankings(torch.device("cuda")), cpu)


def test_grank_trains_and_chooses_its_ranker_weight_on_the_gpu():
    """Users walk the catalogue in steps of one: a sequence model learns it in an epoch."""
    n_items = 200
    timelines = _walks(300, 24, n_items)
    train_end, validation, _ = leave_last_out(timelines)
    torch.manual_seed(0)
    model = GRank(
        GRankConfig(
            n_item_rows=n_items + 1,
            dim=32,
            n_layers=1,
            short_seq_len=16,
            long_seq_len=32,
            ranker_residual=True,
        )
    )
    config = FitConfig(
        lr=5e-3,
        max_epochs=4,
        stride=4,
        weight_average_decay=0.0,
        next_day_windows=False,
        bf16=True,
        progress=False,
    )
    result = fit(
        model,
        grank_batch_loss(LossWeights(), None),
        timelines,
        train_end,
        validation,
        EvalConfig(16, 32, k1=50),
        config,
        torch.device("cuda"),
    )
    assert next(model.parameters()).is_cuda
    assert result.best_score > 0.5, result.history  # the next step is learnable
    assert set(result.ranker_weight_scores) == {"1", "0.75", "0.5", "0.25", "0"}
