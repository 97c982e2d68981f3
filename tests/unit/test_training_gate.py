"""The publish gate (pooled paired bootstrap) and the model registry's pointer rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from common.errors import UserFacingError
from training.checkpoint import load_checkpoint
from training.gate import CANDIDATE, PUBLISHED, GatePolicy, decide, paired_interval
from training.inputs import BehaviorRule, InputSpec, behavior_flags, hash_category, seen_items
from training.model import GRank, GRankConfig
from training.registry import ModelRegistry, checkpoint_day

POLICY = GatePolicy(metric="ndcg@10", window_days=7, min_queries=50, resamples=500)


def records(candidate, baseline, published=None, users=None) -> pa.Table:
    n = len(candidate)
    columns = {
        "day": np.zeros(n, dtype=np.int64),
        "user_id": np.arange(n) if users is None else np.asarray(users),
        f"{CANDIDATE}.ndcg@10": np.asarray(candidate, dtype=float),
        "popularity_7d.ndcg@10": np.asarray(baseline, dtype=float),
        "popularity_all_time.ndcg@10": np.zeros(n),
    }
    if published is not None:
        columns[f"{PUBLISHED}.ndcg@10"] = np.asarray(published, dtype=float)
    return pa.table(columns)


BASELINES = ["popularity_7d", "popularity_all_time"]


def test_the_gate_refuses_a_model_below_popularity_and_an_untrained_one():
    rng = np.random.default_rng(0)
    baseline = rng.uniform(0.1, 0.3, 200)
    below = decide(records(baseline - 0.05, baseline), BASELINES, POLICY)
    assert (
        not below.publishable and "not better than the best baseline popularity_7d" in below.reason
    )
    untrained = decide(records(np.zeros(200), baseline), BASELINES, POLICY)
    assert not untrained.publishable
    equal = decide(records(baseline, baseline), BASELINES, POLICY)  # a tie is not a win
    assert not equal.publishable
    better = decide(records(baseline + 0.05, baseline), BASELINES, POLICY)
    assert better.publishable and better.best_baseline == "popularity_7d"


def test_the_gate_refuses_a_significant_loss_to_the_published_model():
    rng = np.random.default_rng(1)
    baseline = rng.uniform(0.0, 0.1, 300)
    published = baseline + 0.2
    worse = decide(records(published - 0.05, baseline, published), BASELINES, POLICY)
    assert not worse.publishable and "worse than the published model" in worse.reason
    noise = published + rng.normal(0, 0.05, 300)  # no significant difference: publishable
    assert decide(records(noise, baseline, published), BASELINES, POLICY).publishable
    # nothing was published on those days (NaN): only the baseline bar applies
    nan = np.full(300, np.nan)
    assert decide(records(published, baseline, nan), BASELINES, POLICY).publishable


def test_too_few_queries_give_no_verdict():
    verdict = decide(records(np.ones(10), np.zeros(10)), BASELINES, POLICY)
    assert not verdict.publishable and "not enough evidence: 10 queries" in verdict.reason
    assert not decide(None, BASELINES, POLICY).publishable


def test_a_day_the_candidate_scored_itself_is_pooled_once():
    """After a refused bootstrap the next one walks forward over the same days: its own
    records of them replace the earlier candidate's, they are not added to them."""
    from training.daily import pool_evidence

    def day(number: int, candidate: float, n: int = 3) -> pa.Table:
        table = records(np.full(n, candidate), np.full(n, 0.1))
        return table.set_column(0, "day", pa.array(np.full(n, number, dtype=np.int64)))

    earlier = pa.concat_tables([day(1, 0.0), day(2, 0.0), day(3, 0.0)])  # days 1-3, refused
    current = pa.concat_tables([day(2, 0.5), day(3, 0.5), day(4, 0.5)])  # re-walked 2-3, new 4
    pooled = pool_evidence(earlier, current)
    assert pooled.num_rows == 12  # day 1 from before, days 2-4 from the candidate itself
    assert sorted(pooled["day"].to_pylist()) == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    scores = pooled[f"{CANDIDATE}.ndcg@10"].to_pylist()
    by_day = dict(zip(pooled["day"].to_pylist(), scores, strict=True))
    assert by_day == {1: 0.0, 2: 0.5, 3: 0.5, 4: 0.5}
    assert pool_evidence(None, current).num_rows == current.num_rows


def test_the_gate_judges_the_test_day_and_the_13_before_it(tmp_path):
    """The default window is two weeks of evaluations; an older day's records stay out."""
    from types import SimpleNamespace

    from training.daily import _pooled_evidence
    from training.data import day_number
    from training.gate import write_evidence

    def day_records(day: date) -> pa.Table:
        table = records(np.full(2, 0.5), np.full(2, 0.1))
        return table.set_column(0, "day", pa.array(np.full(2, day_number(day), dtype=np.int64)))

    registry = ModelRegistry(tmp_path / "models")
    test_day = date(2000, 12, 20)
    for back in range(1, 21):  # three weeks of earlier evaluations
        folder = registry.evaluation_dir(test_day - timedelta(days=back))
        folder.mkdir(parents=True)
        write_evidence(folder, day_records(test_day - timedelta(days=back)))
    job = SimpleNamespace(test_day=test_day, registry=registry, gate=GatePolicy())
    pooled = _pooled_evidence(job, day_records(test_day))  # type: ignore[arg-type]
    first = day_number(test_day) - 13
    assert sorted(set(pooled["day"].to_pylist())) == list(range(first, day_number(test_day) + 1))
    assert pooled.num_rows == 2 * 14


def test_the_bootstrap_resamples_users_not_queries():
    # one user with 100 identical wins and 99 users at zero: 100 queries of evidence look
    # convincing query by query, but it is one user, so the interval must include 0
    diffs = np.r_[np.ones(100), np.zeros(99)]
    users = np.r_[np.zeros(100), np.arange(1, 100)]
    by_user = paired_interval(diffs, users, POLICY)
    by_query = paired_interval(diffs, np.arange(199), POLICY)
    assert by_user.low <= 0 < by_query.low


# ------------------------------------------------------------------------- registry
def tiny_model(seed: int) -> GRank:
    torch.manual_seed(seed)
    return GRank(
        GRankConfig(n_item_rows=10, dim=8, n_layers=1, n_heads=1, short_seq_len=4, long_seq_len=4)
    )


def commit(registry: ModelRegistry, day: date, seed: int, base: str | None = None) -> str:
    manifest = {
        "test_day": day.isoformat(),
        "data_first_day": "2000-01-01",
        "data_last_day": day.isoformat(),
        "warm_start_from": base,
    }
    return registry.commit(tiny_model(seed), manifest, day)


def test_checkpoints_are_immutable_and_named_by_their_weights(tmp_path):
    registry = ModelRegistry(tmp_path)
    first = commit(registry, date(2000, 1, 5), seed=1)
    assert checkpoint_day(first) == date(2000, 1, 5)
    weights = registry.checkpoint_path(first) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert commit(registry, date(2000, 1, 5), seed=1) == first  # same weights, same folder
    assert weights.stat().st_mtime_ns == mtime  # ... left as it was, never rewritten
    second = commit(registry, date(2000, 1, 5), seed=2)
    assert second != first and registry.candidate(date(2000, 1, 5)) == second
    load_checkpoint(registry.checkpoint_path(first))  # both intact, checksums verified
    load_checkpoint(registry.checkpoint_path(second))
    assert not list((tmp_path / ".scratch").iterdir())


def test_published_only_moves_forward_through_the_gate(tmp_path):
    registry = ModelRegistry(tmp_path)
    day5 = commit(registry, date(2000, 1, 5), seed=1)
    day6 = commit(registry, date(2000, 1, 6), seed=2, base=day5)
    assert registry.publish_if_newer(day6, "gate")[0]
    old_rerun = commit(registry, date(2000, 1, 5), seed=3)
    moved, why = registry.publish_if_newer(old_rerun, "gate")
    assert not moved and "older day" in why
    assert registry.published() == day6
    # an explicit promote may go back, and it is logged; rollback returns
    registry.promote(old_rerun, "promote", "operator test")
    assert registry.published() == old_rerun
    assert registry.previously_published() == day6
    registry.promote(registry.previously_published(), "rollback", "undo")
    assert registry.published() == day6
    actions = [(m.action, m.previous, m.checkpoint) for m in registry.history()]
    assert actions == [
        ("gate", None, day6),
        ("promote", day6, old_rerun),
        ("rollback", old_rerun, day6),
    ]


def test_base_for_follows_the_lineage_back_for_reruns_of_older_days(tmp_path):
    registry = ModelRegistry(tmp_path)
    day5 = commit(registry, date(2000, 1, 5), seed=1)
    registry.publish_if_newer(day5, "gate")
    day6 = commit(registry, date(2000, 1, 6), seed=2, base=day5)
    registry.publish_if_newer(day6, "gate")
    assert registry.base_for(date(2000, 1, 7)) == day6
    assert registry.base_for(date(2000, 1, 6)) == day5  # a re-run of 6 starts where 6 did
    assert registry.base_for(date(2000, 1, 5)) is None  # 5 started from scratch


def test_bad_pointers_are_refused_with_one_line(tmp_path):
    registry = ModelRegistry(tmp_path)
    with pytest.raises(UserFacingError, match="no trained model for 2000-01-05"):
        registry.candidate(date(2000, 1, 5))
    (tmp_path / "PUBLISHED").write_text("2000-01-05\n")  # a pre-registry models/ folder
    with pytest.raises(UserFacingError, match="not a checkpoint id"):
        registry.published()
    (tmp_path / "PUBLISHED").write_text("2000-01-05-0123456789ab\n")
    with pytest.raises(UserFacingError, match="which is not a checkpoint"):
        registry.published()
    with pytest.raises(UserFacingError, match="invalid checkpoint id"):
        registry.checkpoint_path("../../etc")


KILLED_COMMIT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from datetime import date
    from pathlib import Path
    import training.checkpoint as checkpoint
    from training.model import GRank, GRankConfig
    from training.registry import ModelRegistry

    original = checkpoint.save_file
    def save_then_die(tensors, path):  # die after the weights, before the manifest
        original(tensors, path)
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_file = save_then_die
    torch.manual_seed(9)
    model = GRank(GRankConfig(n_item_rows=10, dim=8, n_layers=1, n_heads=1,
                              short_seq_len=4, long_seq_len=4))
    ModelRegistry(Path(sys.argv[1])).commit(model, {"test_day": "2000-01-07"}, date(2000, 1, 7))
    """
)


def test_a_kill_mid_commit_leaves_published_naming_an_intact_checkpoint(tmp_path):
    registry = ModelRegistry(tmp_path)
    day6 = commit(registry, date(2000, 1, 6), seed=2)
    registry.publish_if_newer(day6, "gate")
    done = subprocess.run([sys.executable, "-c", KILLED_COMMIT, str(tmp_path)], check=False)
    assert done.returncode == -signal.SIGKILL
    assert registry.published() == day6
    load_checkpoint(registry.checkpoint_path(day6))
    assert registry.checkpoint_ids() == [day6]  # the half-written one never became one
    with pytest.raises(UserFacingError):
        registry.candidate(date(2000, 1, 7))
    assert os.listdir(tmp_path / ".scratch")  # what it left is hidden scratch


# --------------------------------------------------------------------------- inputs
def test_behavior_flags_hashing_and_the_seen_rule():
    liked = BehaviorRule("liked", ("rating",), min_value=4.0)
    low = BehaviorRule("low", (), max_value=2.0)
    kinds = np.array(["rating", "rating", "click", "rating", "rating"], dtype=object)
    values = np.array([5.0, 3.0, 5.0, np.nan, 1.0])
    assert behavior_flags((liked, low), kinds, values).tolist() == [1, 0, 0, 0, 2]
    assert hash_category("gender", "F", 1024) == hash_category("gender", "F", 1024)
    assert hash_category("gender", "F", 1024) != hash_category("occupation", "F", 1024)
    assert hash_category("gender", None, 1024) == 0
    assert 1 <= hash_category("age", 25, 8) < 8
    history = np.array([1, 2, 3, 2, 4])
    assert seen_items(history, 2).tolist() == [2, 4]
    assert seen_items(history, None).tolist() == [1, 2, 3, 4]
    spec = InputSpec(behaviors=(liked,), user_numeric=("events_7d",), item_numeric=("pop_7d",))
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_item_features_are_standardized_per_day_and_profiles_clipped_to_training():
    from training.inputs import standardize_items

    day = np.array([[0.0, 0.0], [1.0, 10.0], [3.0, 10.0]])  # row 0 is padding
    out = standardize_items(day)
    assert out[0].tolist() == [0.0, 0.0]
    assert out[1:, 0].tolist() == [-1.0, 1.0] and out[1:, 1].tolist() == [0.0, 0.0]
    # a tenure far beyond the training range reads as the longest one trained on
    spec = InputSpec(user_numeric=("tenure_days",))
    torch.manual_seed(0)
    model = GRank(
        GRankConfig(n_item_rows=10, dim=8, n_heads=1, short_seq_len=4, long_seq_len=4, inputs=spec)
    ).eval()
    model.fit_feature_ranges(torch.tensor([0.0]), torch.tensor([5.0]))
    short = torch.tensor([[1, 2, 3, 4]])

    def vector(tenure: float) -> torch.Tensor:
        from training.model import UserContext

        return model.user_vectors(short, UserContext(numeric=torch.tensor([[tenure]])))

    assert torch.equal(vector(5.0), vector(50.0)) and not torch.equal(vector(4.0), vector(5.0))


def test_popularity_orders_equal_counts_by_the_all_time_count_then_by_item_id():
    """The baseline ranks as serving's popularity fallback does, whatever the device's top-k
    does with ties: 50 items share each last-week count, in an order the id alone does not
    give."""
    from training.baselines import Baselines
    from training.features import FeatureHistory

    rng = np.random.default_rng(0)
    n_rows = 301
    week = np.zeros(n_rows, np.float32)
    week[1:] = rng.integers(0, 6, n_rows - 1)
    total = np.zeros(n_rows, np.float32)
    total[1:] = rng.integers(0, 4, n_rows - 1)  # ties here too: the item id settles those
    spec = InputSpec(item_numeric=("pop_7d", "pop_total"))
    history = FeatureHistory(
        spec=spec,
        first_day=100,
        user_ids=np.zeros(0, dtype=np.int64),
        user_numeric=np.zeros((2, 1, 0), np.float32),
        user_categorical=np.zeros((2, 1, 0), np.int64),
        item_table=torch.as_tensor(np.stack([np.zeros((n_rows, 2)), np.c_[week, total]])).float(),
    )
    baselines = Baselines({"popularity_7d": "pop_7d", "popularity_all_time": "pop_total"})
    assert baselines.item_columns == ("pop_7d", "pop_total")
    scores = baselines.scorers(history)["popularity_7d"].scores(np.array([101, 101]))
    expected = sorted(range(n_rows), key=lambda row: (-week[row], -total[row], row))
    assert torch.equal(scores[0], scores[1])
    assert scores[0].argsort(descending=True).tolist() == expected
    assert scores[0].topk(40).indices.tolist() == expected[:40]


def test_feature_groups_select_what_the_model_reads():
    from training.inputs import select_groups

    full = InputSpec(
        behaviors=(BehaviorRule("liked", ("rating",), min_value=4.0),),
        user_numeric=("events_7d",),
        user_categorical=("gender",),
        item_numeric=("pop_7d",),
    )
    assert select_groups(full, ()) == InputSpec()
    assert select_groups(full, ("item_features",)) == InputSpec(item_numeric=("pop_7d",))
    assert select_groups(full, ("behaviors", "user_profile", "item_features")) == full
    with pytest.raises(ValueError, match="unknown feature groups"):
        select_groups(full, ("clicks",))


def test_the_model_config_round_trips_its_inputs(tmp_path: Path):
    spec = InputSpec(user_categorical=("gender",), item_numeric=("pop_1d", "age_days"))
    config = GRankConfig(n_item_rows=5, dim=8, n_heads=1, inputs=spec)
    assert GRankConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    legacy = {k: v for k, v in config.to_dict().items() if k != "inputs"}
    assert GRankConfig.from_dict(legacy).inputs == InputSpec()  # older checkpoints: none
