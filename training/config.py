"""The training layer's knobs: one definition of each, and of its default.

These dataclasses are what training takes; ``grank/config.py`` composes them into the
settings a deployment overrides (``GRANK_TRAIN__<FIELD>``), taking each default from
here. The defaults are the values a ``grank train`` run uses. This module imports no
torch, so reading the settings stays cheap for commands that train nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from common.errors import UserFacingError
from training.inputs import InputSpec

UserVector = Literal["query", "newest", "both"]
USER_VECTORS: tuple[UserVector, ...] = ("query", "newest", "both")


@dataclass(frozen=True)
class GRankConfig:
    """Everything needed to rebuild the network; stored verbatim in checkpoint manifests."""

    n_item_rows: int
    dim: int = 64  # small CPU defaults
    n_layers: int = 2
    n_heads: int = 2
    short_seq_len: int = 64
    long_seq_len: int = 200
    dropout: float = 0.2
    use_aux: bool = True
    use_ranker: bool = True
    # The Ranker's score = the Generator's MIPS score + the MLP's correction, so Stage 2
    # starts from Stage 1's order (docs/model.md). The default is what a manifest written
    # before the option means; a `grank train` run sets train.ranker_residual (True).
    ranker_residual: bool = False
    # How much of a residual Ranker's correction evaluation and serving add to the
    # Generator's score: 1 = the Ranker's order, 0 = the Generator's. Training's
    # validation chooses it (training/train.py ``calibrate_served_order``); 1 is what a manifest
    # written before the option means.
    ranker_weight: float = 1.0
    # How much of the candidate's recent popularity (``inputs.popularity_prior``, as a
    # z-score among the day's items) the served score adds to the Ranker's. Validation
    # chooses it, 0 among the choices (training/train.py ``calibrate_served_order``).
    prior_weight: float = 0.0
    # Where the Generator's user vector (the MIPS query) is read: "query", the output at
    # the query token U, which next-day windows train as a loss term of its own; or
    # "newest", the output at the newest event's slot, which every window trains for the
    # next item (without next-day windows U would be one slot of 65; docs/model.md); or
    # "both", the mean of the two.
    user_vector: UserVector = "query"
    # features besides the item sequences (training/inputs.py); sequence-only by default
    inputs: InputSpec = field(default_factory=InputSpec)

    def __post_init__(self) -> None:
        if self.n_item_rows < 2:
            raise UserFacingError(f"n_item_rows must be at least 2, got {self.n_item_rows}")
        if not 0.0 <= self.ranker_weight <= 1.0:
            raise UserFacingError(f"ranker_weight must be in [0, 1], got {self.ranker_weight}")
        if self.ranker_weight != 1.0 and not self.ranker_residual:
            raise UserFacingError("ranker_weight below 1 needs a residual Ranker")
        if self.prior_weight < 0.0:
            raise UserFacingError(f"prior_weight must be at least 0, got {self.prior_weight}")
        if self.prior_weight and self.inputs.popularity_prior is None:
            raise UserFacingError("a prior_weight needs inputs.popularity_prior (its column)")
        if self.dim % self.n_heads:
            raise UserFacingError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.user_vector not in USER_VECTORS:
            raise UserFacingError(
                f"user_vector must be one of {USER_VECTORS}, got {self.user_vector!r}"
            )

    @property
    def reads_item_features(self) -> bool:
        """Does ranking need the candidates' item features (the Ranker's or the prior's)?"""
        return self.use_ranker and bool(self.inputs.item_numeric or self.prior_weight)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "inputs": self.inputs.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GRankConfig:
        """Rebuild from a manifest; unknown keys mean a newer format and are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserFacingError(f"unknown model config keys {unknown}")
        inputs = InputSpec.from_dict(values.get("inputs", {}))
        return cls(**{**values, "inputs": inputs})


@dataclass(frozen=True)
class LossWeights:
    """The λ's, the softmax temperature and the negative-sampling choices (docs/model.md)."""

    ntp: float = 1.0
    sa: float = 0.1  # 0.5 slowed the exact-softmax Generator (docs/benchmarks.md)
    ca: float = 0.5
    temperature: float = 1.0
    ntp_negatives: Literal["full", "in_batch"] = (
        "full"  # "full" | "in_batch" (logQ-corrected, cheaper)
    )
    logq: bool = True
    # each history slot also learns the items after its next one, up to ``future_window``
    # events ahead (1 = the next item only), their mean weighted by ``future_weight``: on
    # logs whose order inside a sitting is noise (a rating session), the next few items
    # are as much the answer as the next one (docs/model.md, "Losses")
    future_window: int = 1
    future_weight: float = 0.5
    candidates: int = 32  # in-batch candidates per row for L_SA and L_CA (paper: 300)
    # L_CA negatives per row drawn from the Generator's top ``hard_pool``: the Ranker
    # learns to reorder what it will be shown
    hard_negatives: int = 32
    hard_pool: int = 200  # = serving's k1: the candidates the Ranker will reorder
    # True: L_CA ranks each row's target against its in-batch candidates (logQ-corrected)
    # plus the hard negatives (losses.in_batch_ranker_loss); False: each positive inside
    # that top against the hard negatives only, a softmax over what serving shows the
    # Ranker (losses.top_ranker_loss, docs/model.md)
    ranker_in_batch: bool = False
    # with next-day windows, L_CA learns from U's served rows only
    ranker_on_served: bool = True

    def __post_init__(self) -> None:
        if self.future_window < 1:
            raise UserFacingError(f"future_window must be at least 1, got {self.future_window}")
        if self.future_window > 1 and self.ntp_negatives != "full":
            raise UserFacingError("a future_window above 1 needs ntp_negatives 'full'")
        if not self.ranker_in_batch and self.hard_negatives < 1:
            raise UserFacingError(
                "the Ranker learns from hard negatives only (ranker_in_batch_negatives is"
                " false): ranker_hard_negatives must be at least 1"
            )


@dataclass(frozen=True)
class FitConfig:
    """Optimisation knobs of one training run (AdamW, as in the paper; docs/model.md)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    # windows per step: more, smaller steps learn faster per second (docs/model.md)
    batch_size: int = 64
    # the bootstrap trains to convergence: early stopping on the temporal validation
    max_epochs: int = 200
    # epochs without a validation gain before the fit stops: validation can sit on a
    # plateau for three epochs and rise again (docs/benchmarks.md, "Patience")
    patience: int = 6
    plateau_lr_factor: float = 1.0  # lr x this after an epoch without validation gain; 1 = off
    grad_clip: float = 10.0
    stride: int = 64
    seed: int = 42
    # early stopping watches the Generator's metric on the validation queries
    val_metric: Literal["recall@10", "recall@50", "ndcg@10"] = "ndcg@10"
    max_seconds: float | None = None  # wall-clock budget; the epoch in progress ends early
    keep_best: bool = True  # end on the best validation epoch (False: on the last one)
    # validation scores, and the fit keeps, an exponential moving average of the weights
    # (decay per step, 0 = off): ~200 steps of memory smooth out where the last steps of an
    # epoch, or of a time budget, happened to end (docs/model.md)
    weight_average_decay: float = 0.995
    # after a fit that keeps its best epoch, validation chooses among these weights of a
    # residual Ranker's correction the one serving applies (training/train.py
    # ``calibrate_served_order``; empty: keep the model's)
    ranker_weights: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)
    # ...and then, for a model with a popularity prior, among these weights of the prior
    # (0: none; the scale is the Generator's score per standard deviation of popularity)
    prior_weights: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0)
    # ...and before both, where the user vector is read (``GRankConfig.user_vector``):
    # validation chooses among these, ties keeping the earlier (training/train.py
    # ``calibrate_served_order``; empty: keep the model's)
    user_vectors: tuple[UserVector, ...] = ()
    bf16: bool = False  # autocast the forward pass to bf16 (~1.4x steps/s where native)
    # the query token also learns, and is judged, as it serves: from the history up to the
    # day before, one of the day's events as target (data.make_windows, docs/model.md)
    next_day_windows: bool = True
    # the day's distinct items U learns per next-day window (training/data.make_windows)
    next_day_targets: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        if any(not 0.0 <= weight <= 1.0 for weight in self.ranker_weights):
            raise UserFacingError(f"ranker_weights must lie in [0, 1], got {self.ranker_weights}")
        if any(weight < 0.0 for weight in self.prior_weights):
            raise UserFacingError(f"prior_weights must be at least 0, got {self.prior_weights}")
        if unknown := set(self.user_vectors) - set(USER_VECTORS):
            raise UserFacingError(f"user_vectors must be among {USER_VECTORS}, got {unknown}")

    def fixed_epochs(self, epochs: int) -> FitConfig:
        """This config training exactly ``epochs`` epochs and ending on the last: for fits
        whose validation is too thin, or already trained on, to choose weights or stop."""
        return replace(self, max_epochs=epochs, keep_best=False, patience=epochs + 1)


@dataclass(frozen=True)
class EvalConfig:
    """Cutoffs and lengths of one evaluation run.

    ``seen_len``: the items of the user's last ``seen_len`` events are filtered from every
    ranking, exactly the rule serving applies to the online sequence (None: every item of
    the history, the literature's rule).
    """

    short_len: int
    long_len: int
    k1: int = 200  # MIPS candidates the Ranker reorders, as serving hands it
    batch_size: int = 512
    seen_len: int | None = None
