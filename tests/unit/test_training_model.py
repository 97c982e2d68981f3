"""GRank model and checkpoint: masks, padding, ranker, item growth, exact save/load, corruption."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date

import numpy as np
import pytest
import torch

import training.train
from common.errors import UserFacingError
from training.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from training.config import EvalConfig, FitConfig
from training.data import Queries, Timelines, leave_last_out
from training.evaluate import NO_INPUTS, EvalInputs, rankings, rankings_by_filter
from training.features import FeatureHistory
from training.inputs import TIME_SHIFT, BehaviorRule, InputSpec, event_codes
from training.losses import (
    LossWeights,
    TrainBatch,
    generator_hard_negatives,
    grank_batch_loss,
    joint_loss,
    later_labels,
    ntp_loss,
    top_ranker_loss,
)
from training.model import GAP_BUCKETS, GRank, GRankConfig, UserContext, gap_buckets
from training.train import calibrate_served_order, fit, weight_average


def tiny(**overrides: object) -> GRank:
    torch.manual_seed(0)
    values: dict[str, object] = {
        "n_item_rows": 40,
        "dim": 16,
        "n_heads": 2,
        "short_seq_len": 6,
        "long_seq_len": 8,
        "dropout": 0.0,
    }
    values.update(overrides)
    return GRank(GRankConfig(**values)).eval()  # type: ignore[arg-type]


SHORT = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 0, 7]])


def test_candidate_tokens_see_history_and_themselves_only():
    model = tiny()
    candidates = torch.tensor([[10, 11, 12], [10, 11, 12]])
    states, scores = model.generator(SHORT, candidates)
    changed = candidates.clone()
    changed[:, 1] = 20
    states2, scores2 = model.generator(SHORT, changed)
    # history (and U) cannot attend to candidates: identical states
    assert torch.equal(states, states2)
    # candidate 0 and 2 cannot attend to candidate 1: identical scores; candidate 1 changed
    assert torch.allclose(scores[:, [0, 2]], scores2[:, [0, 2]], atol=1e-6)
    assert not torch.allclose(scores[:, 1], scores2[:, 1])
    # a candidate does see the history: another history changes its score
    _, scores3 = model.generator(torch.tensor([[0, 0, 1, 2, 8, 9]] * 2), candidates)
    assert not torch.allclose(scores, scores3)


def test_generator_is_causal_and_user_vector_reads_all_history():
    model = tiny()
    states, _ = model.generator(SHORT)
    changed = SHORT.clone()
    changed[0, 5] = 30  # the newest slot
    states2, _ = model.generator(changed)
    assert torch.allclose(states[0, :5], states2[0, :5], atol=1e-6)  # earlier slots unaffected
    assert not torch.allclose(model.user_vectors(SHORT)[0], model.user_vectors(changed)[0])


def test_padding_unknown_ids_and_shorter_inputs():
    model = tiny()
    empty = torch.zeros(2, 6, dtype=torch.long)
    assert torch.isfinite(model.user_vectors(empty)).all()
    # ids outside the table read the padding row instead of crashing
    unknown = torch.tensor([[0, 0, 0, 0, 99, -3]])
    padded = torch.tensor([[0, 0, 0, 0, 0, 0]])
    assert torch.allclose(model.user_vectors(unknown), model.user_vectors(padded))
    # a shorter (left-padded) input is padded to the configured length
    assert torch.allclose(model.user_vectors(SHORT[:, 2:]), model.user_vectors(SHORT), atol=1e-6)
    assert model.item_vectors().shape == (40, 16)
    assert torch.equal(model.item_vectors()[0], torch.zeros(16))


def test_ranker_scores_each_candidate_independently_even_without_history():
    model = tiny()
    long = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6], [0] * 8])
    scores = model.rank_scores(long, torch.tensor([[1, 2, 3], [1, 2, 3]]))
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    other = model.rank_scores(long, torch.tensor([[1, 9, 3], [1, 9, 3]]))
    assert torch.allclose(scores[:, [0, 2]], other[:, [0, 2]], atol=1e-6)
    assert not torch.allclose(
        scores[0], model.rank_scores(long[[1, 0]], torch.tensor([[1, 2, 3]] * 2))[0]
    )


def test_residual_ranker_starts_from_the_generator_order():
    model = tiny(ranker_residual=True)
    long = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]] * 2)
    cands = torch.tensor([[1, 2, 3], [4, 5, 6]])
    base = model.generator_scores(model.user_vectors(SHORT), cands)
    expected = (model.user_vectors(SHORT)[1] * model.item_vectors()[[4, 5, 6]]).sum(-1)
    assert torch.allclose(base[1], expected, atol=1e-6)
    correction = model.rank_scores(long, cands, torch.zeros_like(base))
    assert torch.allclose(model.rank_scores(long, cands, base), base + correction, atol=1e-6)
    with torch.no_grad():  # no correction learnt yet: Stage 2 keeps Stage 1's order
        model.ranker_mlp[-1].weight.zero_()
        model.ranker_mlp[-1].bias.zero_()
    assert torch.equal(model.rank_scores(long, cands, base), base)
    with pytest.raises(ValueError, match="Generator's scores"):
        model.rank_scores(long, cands)


def test_the_ranker_weight_scales_what_serves_and_never_what_the_loss_sees():
    model = tiny(ranker_residual=True, ranker_weight=0.25)
    long = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]] * 2)
    cands = torch.tensor([[1, 2, 3], [4, 5, 6]])
    base = torch.randn(2, 3)
    correction = model.rank_scores(long, cands, torch.zeros_like(base), correction_weight=1.0)
    assert torch.allclose(model.rank_scores(long, cands, base), base + 0.25 * correction)
    assert torch.allclose(
        model.rank_scores(long, cands, base, correction_weight=1.0), base + correction
    )
    with pytest.raises(UserFacingError, match="residual"):
        tiny(ranker_weight=0.5)
    with pytest.raises(UserFacingError, match=r"\[0, 1\]"):
        tiny(ranker_residual=True, ranker_weight=1.5)
    with pytest.raises(UserFacingError, match="ranker_weights"):
        FitConfig(ranker_weights=(1.0, -0.5))


PRIOR = InputSpec(item_numeric=("pop_1d", "pop_7d"), popularity_prior="pop_7d")


def test_the_popularity_prior_adds_to_what_serves_and_never_to_what_the_loss_sees():
    model = tiny(ranker_residual=True, inputs=PRIOR, prior_weight=0.5)
    assert PRIOR.item_columns == ("pop_1d", "pop_7d")  # read once, though named twice
    long = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]] * 2)
    cands = torch.tensor([[1, 2, 3], [4, 5, 6]])
    base, features = torch.randn(2, 3), torch.randn(2, 3, 2)
    without = model.rank_scores(long, cands, base, features, prior_weight=0.0)
    served = model.rank_scores(long, cands, base, features)
    assert torch.allclose(served, without + 0.5 * features[..., 1])
    with pytest.raises(ValueError, match="item_features"):
        model.rank_scores(long, cands, base)
    # the loss scores the Ranker with the prior left out, whatever weight serving uses
    short, labels = torch.randint(1, 40, (6, 6)), torch.randint(1, 40, (6, 6))
    batch = TrainBatch(
        short,
        torch.randint(1, 40, (6, 8)),
        labels,
        torch.arange(10, 16),
        item_features=lambda c: torch.randn(*c.shape, 2),
    )
    weights = LossWeights(candidates=4, hard_negatives=5, ranker_in_batch=False)
    losses = []
    for prior in (0.0, 2.0):
        model.config = replace(model.config, prior_weight=prior)
        torch.manual_seed(1)
        losses.append(top_ranker_loss(model, model.user_vectors(short), batch, weights).item())
    assert losses[0] == losses[1]
    # a prior column only (the Ranker reads no item features) is the last column read
    only = InputSpec(popularity_prior="pop_7d")
    assert only.item_columns == ("pop_7d",)
    assert InputSpec.from_dict(only.to_dict()) == only
    with pytest.raises(UserFacingError, match="popularity_prior"):
        tiny(prior_weight=0.5)
    with pytest.raises(UserFacingError, match="prior_weights"):
        FitConfig(prior_weights=(0.0, -1.0))


def test_validation_takes_the_prior_only_where_popularity_predicts_the_targets():
    """Each user's target is the day's most popular unseen item of the Generator's top:
    validation takes a prior weight where the popularity column says so, and none (0,
    the smaller of tied weights) where the column is flat."""
    model = tiny(ranker_residual=True, inputs=InputSpec(popularity_prior="pop_7d"))
    with torch.no_grad():
        model.ranker_mlp[-1].weight.zero_()
        model.ranker_mlp[-1].bias.zero_()
    n_users, length = 20, 6
    timelines = _random_timelines(n_users, length)
    spec = EvalConfig(short_len=6, long_len=8, k1=39)
    popularity = torch.zeros(2, 40, 1)  # as-of index 1 serves predictions on day 0
    popularity[1, 1:, 0] = torch.randn(39).sort().values * 3  # item 39 the most popular
    history = item_feature_history(model, popularity)
    inputs = EvalInputs(features=history)
    top = rankings(
        model,
        timelines,
        _all_users(n_users, length, np.zeros(0)),
        spec,
        torch.device("cpu"),
        inputs,
    )["rank"]
    most_popular = top[np.arange(n_users), popularity[1, top, 0].numpy().argmax(axis=1)]
    validation = _all_users(n_users, length, most_popular)
    fit = FitConfig(progress=False)
    _, ranker, scores = calibrate_served_order(model, timelines, validation, spec, fit, inputs)
    assert len(set(ranker.values())) == 1 and model.config.ranker_weight == 1.0  # no correction
    assert model.config.prior_weight > 0 and set(scores) == {"0", "0.125", "0.25", "0.5", "1", "2"}
    assert scores[f"{model.config.prior_weight:g}"] > scores["0"]
    flat = EvalInputs(features=replace(history, item_table=torch.zeros(2, 40, 1)))
    _, _, scores = calibrate_served_order(model, timelines, validation, spec, fit, flat)
    assert model.config.prior_weight == 0.0 and len(set(scores.values())) == 1
    no_prior = tiny(ranker_residual=True)
    assert calibrate_served_order(no_prior, timelines, validation, spec, fit, NO_INPUTS)[2] == {}


def item_feature_history(model: GRank, item_table: torch.Tensor) -> FeatureHistory:
    """Item features only: ``item_table[1 + day]`` is read for predictions on ``day``."""
    return FeatureHistory(
        spec=model.config.inputs,
        first_day=-1,
        user_ids=np.zeros(0, dtype=np.int64),
        user_numeric=np.zeros((1, 1, 0), np.float32),
        user_categorical=np.zeros((1, 1, 0), np.int64),
        item_table=item_table,
    )


def _random_timelines(n_users: int, length: int) -> Timelines:
    """``n_users`` users of ``length`` random items each (ids 1..39), all on one day."""
    items = np.random.default_rng(0).integers(1, 40, n_users * length)
    return Timelines(
        user_ids=np.arange(n_users),
        offsets=np.arange(0, n_users * length + 1, length),
        items=items,
        times=np.zeros(n_users * length, dtype=np.int64),
        first_target=np.zeros(n_users, dtype=np.int64),
        first_day=date(2000, 1, 1),
        last_day=date(2000, 1, 1),
    )


def _all_users(n_users: int, length: int, relevant: np.ndarray) -> Queries:
    """Every user's whole history as input; one relevant item per user (or none), on day 0."""
    return Queries(
        users=np.arange(n_users),
        cuts=np.full(n_users, length),
        relevant_offsets=np.arange(n_users + 1) * min(len(relevant), 1),
        relevant_items=relevant.astype(np.int64),
        days=np.zeros(n_users, dtype=np.int64),
    )


def test_one_pass_under_two_seen_filters_equals_a_pass_under_each():
    """Serving's filter (the last 3 events) and the literature's (every event) from one
    pass: each query's rankings equal those of a pass under its filter alone, in batches
    that mix queries whose masks agree (short histories) and differ (long ones)."""
    model = tiny(n_item_rows=300, ranker_residual=True, inputs=InputSpec(popularity_prior="p"))
    model.config = replace(model.config, prior_weight=1.0)  # the Ranker reads each day's table
    n_users, length = 30, 12
    timelines = _random_timelines(n_users, length)
    rng = np.random.default_rng(1)
    queries = Queries(
        users=np.arange(n_users),
        cuts=rng.integers(1, length + 1, n_users),
        relevant_offsets=np.arange(n_users + 1),
        relevant_items=rng.integers(1, 40, n_users),
        days=rng.integers(0, 3, n_users),
    )
    history = item_feature_history(model, torch.randn(4, 300, 1) * 3)
    inputs = EvalInputs(features=history)
    served = EvalConfig(short_len=6, long_len=8, k1=20, batch_size=7, seen_len=3)
    specs = [served, replace(served, seen_len=None)]
    cpu = torch.device("cpu")
    together = rankings_by_filter(model, timelines, queries, specs, cpu, inputs)
    for spec, ranked in zip(specs, together, strict=True):
        alone = rankings(model, timelines, queries, spec, cpu, inputs)
        assert ranked.keys() == alone.keys() == {"generator", "rank"}
        for stage, top in alone.items():
            np.testing.assert_array_equal(ranked[stage], top)
    differ = (together[0]["rank"] != together[1]["rank"]).any(axis=1)
    assert differ.any() and not differ[queries.cuts <= 3].any()
    with pytest.raises(ValueError, match="seen_len only"):
        rankings_by_filter(model, timelines, queries, [served, replace(served, k1=10)], cpu)


def test_validation_chooses_the_generators_order_over_a_ranker_that_scrambles_it():
    """Targets are the Generator's own first item: its order is perfect on them, and a
    Ranker whose correction drowns the MIPS score can only lose; a Ranker that corrects
    nothing ties it, and a tie keeps the Ranker's whole weight."""
    model = tiny(ranker_residual=True)
    n_users, length = 20, 6
    timelines = _random_timelines(n_users, length)
    spec = EvalConfig(short_len=6, long_len=8, k1=39)

    model.config = replace(model.config, ranker_weight=0.0)
    first = rankings(
        model, timelines, _all_users(n_users, length, np.zeros(0)), spec, torch.device("cpu")
    )
    validation = _all_users(n_users, length, first["rank"][:, 0])
    with torch.no_grad():
        model.ranker_mlp[-1].weight.mul_(1e4)
    model.config = replace(model.config, ranker_weight=1.0)
    fit = FitConfig(progress=False)
    _, scores, _ = calibrate_served_order(model, timelines, validation, spec, fit, NO_INPUTS)
    assert model.config.ranker_weight == 0.0
    assert scores["0"] == pytest.approx(1.0) and scores["1"] < 0.5
    assert set(scores) == {"1", "0.75", "0.5", "0.25", "0"}
    with torch.no_grad():
        model.ranker_mlp[-1].weight.zero_()
        model.ranker_mlp[-1].bias.zero_()
    _, scores, _ = calibrate_served_order(model, timelines, validation, spec, fit, NO_INPUTS)
    assert model.config.ranker_weight == 1.0 and len(set(scores.values())) == 1


def test_disabled_paths_refuse_and_grow_keeps_trained_rows():
    model = tiny(use_aux=False, use_ranker=False)
    with pytest.raises(ValueError):
        model.generator(SHORT, torch.tensor([[1, 2], [1, 2]]))
    with pytest.raises(ValueError):
        model.rank_scores(SHORT, torch.tensor([[1], [2]]))
    before = model.item_vectors().detach().clone()
    config = model.config
    model.grow_items(50)
    assert model.config == replace(config, n_item_rows=50)  # still a typed config...
    assert GRankConfig.from_dict(model.config.to_dict()) == model.config  # ...that saves
    assert torch.equal(model.item_vectors()[:40], before)
    assert model.item_vectors()[40:].abs().max() < 0.2


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = tiny(ranker_residual=True)
    written = save_checkpoint(model, tmp_path / "ck", {"test_day": "2000-01-01"})
    loaded, manifest = load_checkpoint(tmp_path / "ck")
    assert manifest == written and manifest["test_day"] == "2000-01-01"
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    long = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]] * 2)
    cands = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(model.user_vectors(SHORT), loaded.user_vectors(SHORT))
    base = torch.ones(2, 2)
    assert torch.equal(model.rank_scores(long, cands, base), loaded.rank_scores(long, cands, base))
    assert not list(tmp_path.glob(".*"))  # no staging leftovers


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(tiny(), folder, {})
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserFacingError, match=f"checksum mismatch for .*{WEIGHTS_FILE}"):
        load_checkpoint(folder)

    save_checkpoint(tiny(), folder, {})
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["config"]["mystery"] = 1
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserFacingError, match="unknown model config keys"):
        load_checkpoint(folder)
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(UserFacingError, match="unreadable checkpoint manifest"):
        load_checkpoint(folder)
    with pytest.raises(UserFacingError, match="no checkpoint manifest"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(UserFacingError, match="not divisible"):
        GRankConfig(n_item_rows=10, dim=15, n_heads=2)


def test_hard_negatives_only_add_ranker_columns():
    """Hard negatives leave L_NTP and L_SA alone; L_CA changes and still trains the Ranker."""
    short = torch.randint(1, 40, (6, 6))
    long = torch.randint(1, 40, (6, 8))
    labels, targets = torch.randint(1, 40, (6, 6)), torch.arange(10, 16)
    parts = {}
    for hard in (0, 5):
        model = tiny().train()
        torch.manual_seed(1)
        loss, parts[hard] = joint_loss(
            model,
            TrainBatch(short, long, labels, targets),
            LossWeights(candidates=4, hard_negatives=hard, ranker_in_batch=True),
            None,
        )
        loss.backward()
        assert model.ranker_query.weight.grad is not None
        assert float(model.ranker_query.weight.grad.abs().sum()) > 0
    assert parts[0]["ntp"] == parts[5]["ntp"] and parts[0]["sa"] == parts[5]["sa"]
    assert parts[0]["ca"] != parts[5]["ca"]


def test_query_labels_make_the_query_token_a_loss_term_of_its_own():
    """With ``query_labels`` U learns only from the rows that have one, weighted as much as
    every history slot together; without them it is one more next-token slot."""
    short = torch.randint(1, 40, (6, 6))
    long = torch.randint(1, 40, (6, 8))
    labels, targets = torch.randint(1, 40, (6, 6)), torch.arange(10, 16)
    weights = LossWeights(candidates=4, hard_negatives=0, ranker_in_batch=True)
    torch.manual_seed(1)
    model = tiny().eval()
    _, plain = joint_loss(model, TrainBatch(short, long, labels, targets), weights, None)
    assert "ntp_u" not in plain
    none = torch.zeros(6, 2, dtype=torch.long)
    _, unsupervised = joint_loss(
        model, TrainBatch(short, long, labels, targets, query_labels=none), weights, None
    )
    assert "ntp_u" not in unsupervised and unsupervised["ntp"] != plain["ntp"]
    some = torch.tensor([[0, 0], [0, 0], [0, 0], [21, 0], [22, 0], [23, 0]])
    loss, parts = joint_loss(
        model, TrainBatch(short, long, labels, targets, query_labels=some), weights, None
    )
    assert parts["ntp"] == unsupervised["ntp"] and parts["ntp_u"] > 0
    # a second label of a row is one more (row, label) pair of U's term, not another row
    more = some.clone()
    more[3, 1] = 24
    _, two = joint_loss(
        model, TrainBatch(short, long, labels, targets, query_labels=more), weights, None
    )
    assert two["ntp_u"] != parts["ntp_u"] and two["ca"] == parts["ca"]
    assert float(loss.detach()) == pytest.approx(
        parts["ntp"] + parts["ntp_u"] + weights.sa * parts["sa"] + weights.ca * parts["ca"],
        rel=1e-4,
    )


def test_the_user_vector_is_read_at_the_query_token_or_at_the_newest_slot():
    """``user_vector``: MIPS reads U's output or the newest event's, and the Ranker learns
    on the list that vector retrieves; the next-token terms do not change."""
    short = torch.randint(1, 40, (6, 6))
    long = torch.randint(1, 40, (6, 8))
    labels, targets = torch.randint(1, 40, (6, 6)), torch.arange(10, 16)
    query = tiny(ranker_residual=True)
    newest = tiny(ranker_residual=True, user_vector="newest")
    newest.load_state_dict(query.state_dict())
    states, _ = query.generator(short)
    assert torch.equal(query.user_vectors(short), states[:, -1])
    assert torch.equal(newest.user_vectors(short), states[:, -2])
    assert not torch.equal(states[:, -1], states[:, -2])
    both = tiny(ranker_residual=True, user_vector="both")
    both.load_state_dict(query.state_dict())
    torch.testing.assert_close(both.user_vectors(short), (states[:, -1] + states[:, -2]) / 2)
    weights = LossWeights(candidates=4, hard_negatives=3, hard_pool=10)
    parts = {}
    for name, model in (("query", query), ("newest", newest)):
        torch.manual_seed(2)  # the same draw of hard negatives from each one's top 10
        _, parts[name] = joint_loss(model, TrainBatch(short, long, labels, targets), weights, None)
    assert parts["query"]["ntp"] == parts["newest"]["ntp"]
    assert parts["query"]["ca"] != parts["newest"]["ca"]
    with pytest.raises(UserFacingError, match="user_vector"):
        tiny(user_vector="last")


def test_validation_chooses_where_the_user_vector_is_read():
    """Targets are the Generator's first item as one readout lists it: validation takes
    that readout wherever it stands among the choices, and none without choices."""
    n_users, length = 20, 6
    timelines = _random_timelines(n_users, length)
    spec = EvalConfig(short_len=6, long_len=8, k1=39)
    fit = FitConfig(progress=False)
    for readout, choices in (
        ("query", ("newest", "both", "query")),
        ("newest", ("query", "both", "newest")),
    ):
        model = tiny(user_vector=readout)
        first = rankings(
            model, timelines, _all_users(n_users, length, np.zeros(0)), spec, torch.device("cpu")
        )["generator"][:, 0]
        validation = _all_users(n_users, length, first)
        model.config = replace(model.config, user_vector=choices[0])
        scores, _, _ = calibrate_served_order(
            model, timelines, validation, spec, replace(fit, user_vectors=choices), NO_INPUTS
        )
        assert model.config.user_vector == readout and list(scores) == list(choices)
        assert scores[readout] == pytest.approx(1.0) and min(scores.values()) < 1.0
    nothing = calibrate_served_order(model, timelines, validation, spec, fit, NO_INPUTS)
    assert nothing == ({}, {}, {})  # no readouts offered, no residual Ranker, no prior
    assert model.config.user_vector == "newest"
    with pytest.raises(UserFacingError, match="user_vectors"):
        FitConfig(user_vectors=("last",))  # type: ignore[arg-type]


def test_each_slot_reads_the_items_after_its_next_one_within_the_window():
    labels = torch.tensor([[0, 0, 3, 4, 5, 6]])
    assert later_labels(labels, 1) is None
    assert later_labels(labels, 3).tolist() == [[[0, 3], [3, 4], [4, 5], [5, 6], [6, 0], [0, 0]]]


def test_the_later_items_add_their_mean_cross_entropy_to_the_next_items():
    """The later term is the mean -log p of the known later items under the same full
    softmax, weighted; no known later item leaves the next-item loss exactly."""
    torch.manual_seed(0)
    states, table = torch.randn(3, 8), torch.randn(10, 8)
    labels = torch.tensor([1, 2, 3])
    later = torch.tensor([[4, 5], [6, 0], [0, 0]])
    weights = LossWeights(future_window=3, future_weight=0.5)
    log_p = torch.log_softmax(
        torch.cat([torch.full((3, 1), -1e30), (states @ table.T)[:, 1:]], 1), 1
    )
    expected = (
        -log_p[[0, 1, 2], labels].mean() - 0.5 * (log_p[0, 4] + log_p[0, 5] + log_p[1, 6]) / 3
    )
    loss = ntp_loss(states, labels, table, labels, weights, None, later)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    plain = ntp_loss(states, labels, table, labels, weights, None)
    assert float(ntp_loss(states, labels, table, labels, weights, None, later * 0)) == float(plain)
    assert float(plain) == pytest.approx(float(-log_p[[0, 1, 2], labels].mean()), rel=1e-5)


def test_a_later_window_changes_the_history_term_only():
    short, long = torch.randint(1, 40, (4, 6)), torch.randint(1, 40, (4, 8))
    labels, targets = torch.randint(1, 40, (4, 6)), torch.arange(10, 14)
    model = tiny().eval()
    base = LossWeights(candidates=4, hard_negatives=0, ranker_in_batch=True)

    def loss_parts(window: int) -> dict[str, float]:
        torch.manual_seed(1)  # the same in-batch candidates for both
        batch = TrainBatch(short, long, labels, targets)
        return joint_loss(model, batch, replace(base, future_window=window), None)[1]

    parts = {window: loss_parts(window) for window in (1, 4)}
    assert parts[4]["ntp"] > parts[1]["ntp"] and parts[4]["ca"] == parts[1]["ca"]
    with pytest.raises(UserFacingError, match="future_window"):
        LossWeights(future_window=0)
    with pytest.raises(UserFacingError, match="full"):
        LossWeights(future_window=2, ntp_negatives="in_batch")


def test_a_batch_with_no_history_slot_still_has_a_finite_loss():
    """A batch of next-day windows with nothing before their day (a last batch of one row)
    still trains U: the empty history term is 0, not an empty mean's NaN."""
    short, long = torch.randint(1, 40, (1, 6)), torch.randint(1, 40, (1, 8))
    labels, targets = torch.zeros(1, 6, dtype=torch.long), torch.tensor([12])
    torch.manual_seed(1)
    model = tiny().train()
    loss, parts = joint_loss(
        model,
        TrainBatch(short, long, labels, targets, query_labels=torch.tensor([[12, 30]])),
        LossWeights(candidates=4, hard_negatives=0, ranker_in_batch=True),
        None,
    )
    assert parts["ntp"] == 0.0 and parts["ntp_u"] > 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_the_ranker_can_learn_from_the_served_rows_only():
    """``ranker_on_served``: L_CA is the mean over U's next-day rows; the others weigh 0."""
    short, long = torch.randint(1, 40, (6, 6)), torch.randint(1, 40, (6, 8))
    labels, targets = torch.randint(1, 40, (6, 6)), torch.arange(10, 16)
    served = LossWeights(
        candidates=4, hard_negatives=0, ranker_on_served=True, ranker_in_batch=True
    )
    torch.manual_seed(1)
    model = tiny().eval()
    none = torch.zeros(6, 1, dtype=torch.long)
    _, unserved = joint_loss(
        model, TrainBatch(short, long, labels, targets, query_labels=none), served, None
    )
    _, everywhere = joint_loss(
        model,
        TrainBatch(short, long, labels, targets, query_labels=none),
        LossWeights(candidates=4, hard_negatives=0, ranker_on_served=False, ranker_in_batch=True),
        None,
    )
    assert unserved["ca"] == 0.0 and everywhere["ca"] > 0
    last = torch.tensor([[0], [0], [0], [0], [0], [15]])
    _, one_row = joint_loss(
        model, TrainBatch(short, long, labels, targets, query_labels=last), served, None
    )
    assert 0 < one_row["ca"] != everywhere["ca"]


def test_features_reach_the_query_token_and_the_ranker():
    """Each feature group changes what it should, and only that: the profile and the pooled
    behaviours move the user vector, item features move the Ranker's scores."""
    from training.inputs import BehaviorRule, InputSpec

    spec = InputSpec(
        behaviors=(BehaviorRule("liked", (), min_value=4.0),),
        user_numeric=("events_7d",),
        user_categorical=("gender",),
        item_numeric=("pop_7d",),
    )
    torch.manual_seed(0)
    model = GRank(
        GRankConfig(
            n_item_rows=40,
            dim=16,
            n_layers=1,
            n_heads=2,
            short_seq_len=6,
            long_seq_len=8,
            dropout=0.0,
            inputs=spec,
            ranker_residual=True,
        )
    )
    model.eval()
    long = torch.randint(1, 40, (2, 8))
    base = UserContext(
        long,
        torch.zeros(2, 8, dtype=torch.long),
        torch.zeros(2, 1),
        torch.ones(2, 1, dtype=torch.long),
    )
    vectors = model.user_vectors(SHORT, base)
    for changed in (
        UserContext(long, torch.ones(2, 8, dtype=torch.long), base.numeric, base.categorical),
        UserContext(long, base.long_codes, torch.ones(2, 1), base.categorical),
        UserContext(long, base.long_codes, base.numeric, torch.full((2, 1), 7)),
    ):
        assert not torch.allclose(vectors, model.user_vectors(SHORT, changed))
    with pytest.raises(ValueError, match="reads user features"):
        model.user_vectors(SHORT)
    cands = torch.tensor([[1, 2, 3], [4, 5, 6]])
    gen = model.generator_scores(vectors, cands)
    popular = model.rank_scores(long, cands, gen, torch.ones(2, 3, 1))
    unpopular = model.rank_scores(long, cands, gen, torch.zeros(2, 3, 1))
    assert not torch.allclose(popular, unpopular)
    with pytest.raises(ValueError, match="reads item features"):
        model.rank_scores(long, cands, gen)


def test_event_codes_carry_behaviour_bits_below_and_the_second_above():
    liked = BehaviorRule("liked", ("rating",), min_value=4.0)
    kinds = np.array(["rating", "rating", "view"], dtype=object)
    values = np.array([5.0, 1.0, np.nan])
    times_us = np.array([1_000_000, 2_500_000, 90_000_000])
    assert event_codes(InputSpec(), kinds, values, times_us) is None
    assert event_codes(InputSpec(behaviors=(liked,)), kinds, values, times_us).tolist() == [1, 0, 0]
    both = event_codes(InputSpec(behaviors=(liked,), time_gaps=True), kinds, values, times_us)
    assert (both >> TIME_SHIFT).tolist() == [1, 2, 90]  # whole seconds
    assert (both & ((1 << TIME_SHIFT) - 1)).tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="behaviour rules fit"):
        InputSpec(behaviors=(liked,) * (TIME_SHIFT + 1))


def test_gap_buckets_grow_with_log2_of_the_seconds_since_the_event_before():
    seconds = torch.tensor([[0, 0, 100, 100, 101, 104, 100 + 2**40]])
    buckets = gap_buckets(seconds << TIME_SHIFT | 1)  # behaviour bits do not count
    # padding, no earlier event, 0 s, 1 s, 3 s, and a gap beyond the last bucket
    assert buckets.tolist() == [[0, 1, 2, 3, 4, GAP_BUCKETS - 1]]


def test_a_model_with_time_gaps_reads_the_times_of_its_short_history():
    torch.manual_seed(0)
    model = tiny(long_seq_len=8, inputs=InputSpec(time_gaps=True)).eval()
    long = torch.randint(1, 40, (2, 8))
    short = long[:, -6:]
    seconds = torch.arange(1, 9).repeat(2, 1) * 1000

    def vectors(times: torch.Tensor) -> torch.Tensor:
        codes = times << TIME_SHIFT
        return model.user_vectors(short, UserContext(long, codes))

    base = vectors(seconds)
    assert torch.allclose(base, vectors(seconds + 10**6))  # the same gaps, later
    assert torch.allclose(base, vectors(torch.cat([seconds[:, :1] - 10**6, seconds[:, 1:]], 1)))
    later = seconds.clone()
    later[:, -1] += 10**6  # the newest event came a long while after the one before
    assert not torch.allclose(base, vectors(later))
    # no slot reads a later event's time: the older slots' states stay as they were
    states = [
        model.generator(short, user=UserContext(long, t << TIME_SHIFT))[0] for t in (seconds, later)
    ]
    assert torch.allclose(states[0][:, :-2], states[1][:, :-2])
    with pytest.raises(ValueError, match="reads time gaps"):
        model.user_vectors(short)


def test_the_ranker_learns_each_served_item_against_the_generator_top_it_reorders():
    """Default L_CA: each served label in the Generator's top ``hard_pool`` against items
    drawn from that top, never the row's other labels; labels outside it teach nothing."""
    model = tiny()
    short = torch.randint(1, 40, (3, 6))
    user_vectors = model.user_vectors(short)
    scores = user_vectors @ model.item_vectors().T
    scores[:, 0] = float("-inf")
    order = scores.argsort(dim=1, descending=True)  # the last column is padding
    # row 0 was served its best and 2nd best items, row 1 its worst, row 2 nothing
    served = torch.zeros(3, 2, dtype=torch.long)
    served[0] = order[0, :2]
    served[1, 0] = order[1, -2]
    weights = LossWeights(hard_negatives=50, hard_pool=5)
    batch = TrainBatch(short, short, short, served[:, 0], query_labels=served)
    torch.manual_seed(0)
    loss = top_ranker_loss(model, user_vectors, batch, weights)
    torch.manual_seed(0)
    hard, reaches_ranker = generator_hard_negatives(
        user_vectors, model.item_vectors(), served, weights
    )
    assert reaches_ranker.tolist() == [[True, True], [False, False], [False, False]]
    assert set(hard[0].tolist()) == set(order[0, 2:5].tolist())  # the top 5 but the labels
    ranked = torch.cat([served, hard], dim=1)
    ranker = model.rank_scores(short, ranked, model.generator_scores(user_vectors, ranked))
    pairs = [
        -torch.log_softmax(torch.cat([ranker[0, j : j + 1], ranker[0, 2:]]), 0)[0] for j in (0, 1)
    ]
    assert torch.isclose(loss, (pairs[0] + pairs[1]) / 2)


def test_a_ranker_loss_needs_negatives():
    with pytest.raises(UserFacingError, match="ranker_hard_negatives must be at least 1"):
        LossWeights(hard_negatives=0)
    assert LossWeights(hard_negatives=0, ranker_in_batch=True).hard_negatives == 0


def test_the_weight_average_weighs_the_trained_steps_and_never_the_initial_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    decay = 0.9
    average = weight_average(model, optimizer, decay)
    assert average is not None
    after_each_step = []
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        after_each_step.append([p.detach().clone() for p in model.parameters()])
    shares = torch.tensor([decay ** (3 - step) for step in range(4)])
    shares /= shares.sum()
    for index, averaged in enumerate(average.parameters()):
        expected = sum(s * after[index] for s, after in zip(shares, after_each_step, strict=True))
        assert torch.allclose(averaged, expected, atol=1e-6)
    assert weight_average(model, optimizer, 0.0) is None


def _fit_with_validation_scores(monkeypatch, scores: list[float], config: FitConfig):
    """A tiny fit whose epochs validate at ``scores`` in turn (the last one repeats)."""
    scored: list[float] = []

    def scripted(*_args: object) -> float:
        scored.append(scores[min(len(scored), len(scores) - 1)])
        return scored[-1]

    monkeypatch.setattr(training.train, "validation_score", scripted)
    timelines = _random_timelines(8, 10)
    train_end, validation, _ = leave_last_out(timelines)
    loss = grank_batch_loss(LossWeights(candidates=4, hard_negatives=2), None)
    spec = EvalConfig(short_len=6, long_len=8)
    return fit(tiny(), loss, timelines, train_end, validation, spec, config, torch.device("cpu"))


def test_the_default_patience_trains_through_a_three_epoch_plateau(monkeypatch):
    """On ML-1M a fit's validation sat level for three epochs and then rose well past it
    (docs/benchmarks.md, "Patience"): the default fit trains on and keeps the later best."""
    plateau_then_gain = [0.10, 0.12, 0.12, 0.12, 0.12, 0.14, 0.13]
    config = FitConfig(
        max_epochs=20, stride=4, next_day_windows=False, weight_average_decay=0.0, progress=False
    )
    result = _fit_with_validation_scores(monkeypatch, plateau_then_gain, config)
    assert result.best_epoch == 6
    assert len(result.history) == 6 + config.patience
    assert result.stop_reason == f"no validation gain for {config.patience} epochs"
    # three epochs of patience stop on the plateau and keep its first epoch
    short = _fit_with_validation_scores(monkeypatch, plateau_then_gain, replace(config, patience=3))
    assert (short.best_epoch, len(short.history)) == (2, 5)
