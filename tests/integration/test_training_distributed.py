"""Data-parallel training: the shards of a global batch, and two processes against one.

The end-to-end test runs the real ``grank train`` twice from scratch on the same ML-100K
features (built by the real Spark job), once in one process and once in two torchrun
workers on gloo, at the same global batch (64) and seed, and compares the best
validation recall@50 each registered, and their training losses epoch by epoch.

Why tolerances at all: the two runs cannot be bit-identical. Each rank's half of the
batch supplies the in-batch negatives of its rows, rank 1 draws its own dropout masks and
hard negatives, and the gradient average sums in another order. What must hold is that
these differences are noise, not a different model. Measured on this fixture (five
epochs, one thread per process): one process reaches a best recall@50 of 0.1867 /
0.1467 / 0.1600 with seeds 1 / 2 / 3, two processes 0.1733 with seed 1. The metric moves
in steps of 1/75 (75 validation users), and one process spans 0.04 (three users) between
seeds, so the validation tolerance is 0.04: two processes must land within the spread
one process shows against itself. The epoch losses are a finer signal (thousands of
targets): between seeds they differ by up to 0.03, two processes differed from one by at
most 0.036, so they must stay within 0.1. A run whose ranks did not average their
gradients fails earlier: the ranks end with different weights and nothing is registered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserFacingError
from tests.conftest import TRAINING_LAST
from training.checkpoint import load_checkpoint
from training.distributed import DataParallel, rank_batches
from training.registry import ModelRegistry

LAST = TRAINING_LAST
METRIC_TOLERANCE = 0.04  # best validation recall@50, absolute; see the module docstring
LOSS_TOLERANCE = 0.1  # mean training loss of each epoch, absolute
SMALL_ENV = {
    "GRANK_DATASET": "ml-100k",
    "GRANK_TRAIN__SEED": "1",
    "GRANK_TRAIN__DIM": "16",
    "GRANK_TRAIN__N_LAYERS": "1",
    "GRANK_TRAIN__BATCH_SIZE": "64",
    "GRANK_TRAIN__LR": "0.005",
    "GRANK_TRAIN__MAX_EPOCHS": "5",
    "GRANK_TRAIN__PATIENCE": "5",
    "GRANK_TRAIN__MAX_MINUTES": "0",  # no time budget: the weights must not depend on speed
    "GRANK_TRAIN__CATCHUP_EPOCHS": "0",
    "GRANK_TRAIN__CANDIDATES_PER_ROW": "32",
    "GRANK_TRAIN__K1": "50",
    # half the days validate: 75 validation users instead of 29 at the default 0.9
    "GRANK_TRAIN__VAL_QUANTILE": "0.5",
    "GRANK_TRAIN__VAL_METRIC": "recall@50",
    # the tolerances below were measured with the query token on every window: next-day
    # windows leave ML-100K's validation a few dozen users and U's term a few rows a batch
    "GRANK_TRAIN__NEXT_DAY_WINDOWS": "false",
    "GRANK_FEATURES__SHORT_SEQ_LEN": "16",
    "GRANK_FEATURES__LONG_SEQ_LEN": "32",
    # one thread per process in both runs: the same arithmetic per process, and no
    # OpenMP spinning when the machine's cores are shared with other jobs
    "OMP_NUM_THREADS": "1",
}


# ------------------------------------------------------------------ shards of a batch
def test_each_rank_takes_an_equal_disjoint_share_of_every_global_batch():
    n_rows, batch = 23, 6
    single = rank_batches(n_rows, batch, np.random.default_rng(7), DataParallel())
    for world in (2, 3):
        shards = [
            rank_batches(n_rows, batch, np.random.default_rng(7), DataParallel(rank, world))
            for rank in range(world)
        ]
        assert all(len(s) == len(single) for s in shards)  # every rank takes as many steps
        for step, global_rows in enumerate(single):
            parts = [s[step] for s in shards]
            assert all(len(p) == len(parts[0]) for p in parts)
            assert len(parts[0]) == -(-len(global_rows) // world)  # global / N, rounded up
            # the global batch of one process, split; a short last batch padded from the epoch
            joined = Counter(np.concatenate(parts).tolist())
            assert not Counter(global_rows.tolist()) - joined
            padding = joined - Counter(global_rows.tolist())
            assert padding.total() == world * len(parts[0]) - len(global_rows)
            assert set(padding) <= set(single[0].tolist())
    # deterministic by seed, new order each epoch (the generator moves on)
    rng = np.random.default_rng(7)
    first, second = (rank_batches(n_rows, batch, rng, DataParallel(1, 2)) for _ in range(2))
    again = rank_batches(n_rows, batch, np.random.default_rng(7), DataParallel(1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(UserFacingError, match="does not split evenly over 3 processes"):
        rank_batches(10, 64, np.random.default_rng(0), DataParallel(0, 3))


# ------------------------------------------------------------ one process against two
@pytest.fixture(scope="module")
def built_root(ml100k_training_root) -> Path:
    """ML-100K 1998-03-25..04-04 landed and its features built (read-only)."""
    return ml100k_training_root


def _root(built_root: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("features", "lake"):
        (folder / name).symlink_to(built_root / name)
    return folder


def _train(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``grank train`` as an operator runs it: its own process, settings from the environment."""
    env = {**os.environ, **SMALL_ENV, "GRANK_DATA_ROOT": str(root)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "grank",
            "train",
            "--date",
            LAST.isoformat(),
            "--from-scratch",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_two_processes_reach_the_validation_metric_of_one(built_root, tmp_path):
    one_root, two_root = _root(built_root, tmp_path / "one"), _root(built_root, tmp_path / "two")
    one = _train(one_root)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(two_root, "--processes", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained from scratch") == 1, two.stdout  # rank 0 reports alone

    manifests = {}
    for name, root in (("one", one_root), ("two", two_root)):
        registry = ModelRegistry(root / "models")
        checkpoint = registry.candidate(LAST)
        model, manifests[name] = load_checkpoint(registry.checkpoint_path(checkpoint))
        assert registry.checkpoint_ids() == [checkpoint]  # one checkpoint: rank 0 wrote it
        assert model.config.n_item_rows == 1683
    one_m, two_m = manifests["one"], manifests["two"]
    assert (one_m["processes"], two_m["processes"]) == (1, 2)
    assert set(one_m) == set(two_m)  # the same format
    assert one_m["fit"] == two_m["fit"]  # the same global batch, seed and schedule
    assert len(one_m["history"]) == len(two_m["history"]) == 5
    for one_epoch, two_epoch in zip(one_m["history"], two_m["history"], strict=True):
        assert abs(two_epoch["loss"] - one_epoch["loss"]) <= LOSS_TOLERANCE, (one_epoch, two_epoch)
    assert two_m["history"][-1]["loss"] < two_m["history"][0]["loss"] - 0.5  # it learned
    assert abs(two_m["val_score"] - one_m["val_score"]) <= METRIC_TOLERANCE, (
        one_m["val_score"],
        two_m["val_score"],
    )


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_launch(
    built_root, tmp_path
):
    root = _root(built_root, tmp_path / "root")
    result = _train(root, "--processes", "3")
    assert result.returncode == 1
    assert "error: train.batch_size 64 does not split evenly over 3 processes" in result.stderr
    assert not (root / "models").exists()
