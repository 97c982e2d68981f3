"""The GRank network: a MIPS-searchable Generator and a candidate-aware Ranker on one item table.

This module is the model *definition* only (docs/architecture.md, Contract 4): serving
imports it, so it must not import training loops, Spark, Feast or pandas.

Shapes are batch-first; item id 0 is padding; sequences are left-padded, oldest to newest,
the most recent event last. docs/model.md explains every choice the paper leaves open.

- ``user_vectors(short_seq)``: the Generator's output at the user query token ``U``,
  appended after the short history and read through causal self-attention (or, with
  ``user_vector = "newest"``, at the newest event's slot).
- ``item_vectors()``: the shared item embedding table; ``user · item`` is the MIPS score.
- ``rank_scores(long_seq, candidates, generator_scores)``: the Ranker, single-head
  cross-attention with each candidate as the query over the long history, then an MLP;
  with ``ranker_residual`` the MLP's output, times ``ranker_weight``, is added to the
  Generator's MIPS score; with a popularity prior, ``prior_weight`` times the candidate's
  recent popularity is added too.
- ``generator(short_seq, aux_candidates)``: training-time entry point that additionally
  appends candidate tokens under the decomposed mask (each candidate sees the history
  and itself, never another candidate; history never sees candidates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from training.config import GRankConfig
from training.inputs import TIME_SHIFT

ITEM_TABLE_KEY = "item_embedding.weight"  # state-dict name of the shared item table
# time-gap buckets: 0 padding, 1 no earlier event, 2 + floor(log2(1 + seconds)) up to the
# last bucket (2^29 s, 17 years, and beyond)
GAP_BUCKETS = 32


def gap_buckets(codes: torch.Tensor) -> torch.Tensor:
    """[B, L] bucket of each slot's time since the event before it, from codes [B, L + 1].

    ``codes`` are left-padded event codes whose first column is the predecessor of the
    first slot. Buckets grow with log2 of the gap in seconds: a minute and an hour, a day
    and a month fall in different buckets, two ratings typed a second apart in the same.
    """
    seconds = codes >> TIME_SHIFT
    present = seconds > 0
    gaps = (seconds[:, 1:] - seconds[:, :-1]).clamp(min=0).double()
    buckets = (2 + torch.log2(1 + gaps).floor().long()).clamp(max=GAP_BUCKETS - 1)
    buckets = torch.where(present[:, :-1], buckets, torch.ones_like(buckets))
    return torch.where(present[:, 1:], buckets, torch.zeros_like(buckets))


@dataclass(frozen=True)
class UserContext:
    """The user-side inputs besides the short sequence, as tensors (training/inputs.py).

    ``long_seq`` [B, Ll] with ``long_codes`` [B, Ll] (event codes, aligned:
    ``training.inputs.event_codes``);
    ``numeric`` [B, Fu] (scaled) and ``categorical`` [B, Cu] (hashed buckets) are the user's
    features as of the day before the prediction. Any part the config does not use may
    be None.
    """

    long_seq: torch.Tensor | None = None
    long_codes: torch.Tensor | None = None
    numeric: torch.Tensor | None = None
    categorical: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-LN transformer block that also advances candidate tokens under the decomposed mask.

    History tokens run ordinary causal attention. Candidate tokens (optional) reuse this
    layer's history keys/values plus their own key/value: the dense mask's candidate
    block is diagonal, so computing it as "history part + self part" costs
    O(C·L·d) instead of O((L+C)²·d) (the paper's 82% FLOP saving) with identical maths.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., T, 3d] projections split into q, k, v of shape [..., H, T, d/H]."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.n_heads, -1)
        return tuple(t.reshape(shape).transpose(-3, -2) for t in (q, k, v))

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H, T, d/H] back to [..., T, d]."""
        x = x.transpose(-3, -2)
        return x.reshape(*x.shape[:-2], -1)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.ffn(self.ln_ffn(x)))

    def forward(
        self, hist: torch.Tensor, mask: torch.Tensor, cand: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hist [B, L, d] with mask [B, 1, L, L] (True = may attend); cand [B, C, d] or None."""
        q, k, v = self._heads(self.ln_attn(hist))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        new_hist = self._ffn(hist + self.drop(self.proj(self._merge(attended))))
        if cand is None:
            return new_hist, None
        qc, kc, vc = self._heads(self.ln_attn(cand))  # [B, H, C, d/H]
        scale = 1.0 / math.sqrt(qc.shape[-1])
        # keys a candidate may see: every real history token (padding excluded) and itself
        key_ok = mask[:, :, -1:, :]  # the last (U) row sees all real history tokens
        hist_logits = (qc @ k.transpose(-1, -2)) * scale
        hist_logits = hist_logits.masked_fill(~key_ok, float("-inf"))
        self_logit = (qc * kc).sum(-1, keepdim=True) * scale
        weights = torch.softmax(torch.cat([hist_logits, self_logit], dim=-1), dim=-1)
        mixed = weights[..., :-1] @ v + weights[..., -1:] * vc
        new_cand = self._ffn(cand + self.drop(self.proj(self._merge(mixed))))
        return new_hist, new_cand


class GRank(nn.Module):
    """Generator + auxiliary target-aware path + Ranker over one shared item embedding table."""

    def __init__(self, config: GRankConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_embedding = nn.Embedding(config.n_item_rows, d, padding_idx=0)
        # Generator: slot positions count from the right (the newest item is always slot Ls-1),
        # plus one slot for the user query token U
        self.short_positions = nn.Embedding(config.short_seq_len + 1, d)
        self.query_token = nn.Parameter(torch.zeros(d))
        self.query_from_history = nn.Linear(d, d)
        self.embed_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(d, config.n_heads, config.dropout) for _ in range(config.n_layers)
        )
        self.final_norm = nn.LayerNorm(d)
        spec = config.inputs
        if spec.behaviors:  # U = [profile ; pooled sequences of each behaviour] (the paper)
            self.behavior_pool = nn.Linear(d * len(spec.behaviors), d)
        if spec.user_numeric:
            self.user_numeric = nn.Sequential(
                nn.Linear(len(spec.user_numeric), d), nn.GELU(), nn.Linear(d, d)
            )
            # the range each profile feature had in training: values beyond it (a tenure
            # longer than any seen, years later) are clipped, not extrapolated
            self.user_numeric_low: torch.Tensor
            self.user_numeric_high: torch.Tensor
            width = len(spec.user_numeric)
            self.register_buffer("user_numeric_low", torch.full((width,), -torch.inf))
            self.register_buffer("user_numeric_high", torch.full((width,), torch.inf))
        if spec.user_categorical:
            self.user_categories = nn.Embedding(spec.categorical_buckets, d, padding_idx=0)
        if spec.time_gaps:
            self.gap_embedding = nn.Embedding(GAP_BUCKETS, d, padding_idx=0)
        if config.use_aux:
            self.aux_input = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
            self.aux_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        if config.use_ranker:
            self.long_positions = nn.Embedding(config.long_seq_len, d)
            self.ranker_history = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
            self.ranker_query = nn.Linear(d, d)
            self.ranker_key = nn.Linear(d, d)
            self.ranker_value = nn.Linear(d, d)
            # a learned always-present slot so users without history still get a score
            self.ranker_null_key = nn.Parameter(torch.zeros(d))
            self.ranker_null_value = nn.Parameter(torch.zeros(d))
            item_features = len(spec.item_numeric)
            if item_features:
                self.ranker_item_features = nn.Sequential(
                    nn.Linear(item_features, d), nn.GELU(), nn.Linear(d, d)
                )
            width = (4 if item_features else 3) * d
            self.ranker_mlp = nn.Sequential(
                nn.Linear(width, 2 * d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(2 * d, 1)
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small normal init for embeddings (std 0.02, as in GPT/SASRec); row 0 stays zero."""
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    # ------------------------------------------------------------------ items
    def known(self, item_ids: torch.Tensor) -> torch.Tensor:
        """``item_ids`` with ids outside the table replaced by 0: unknown items act as padding.

        A model older than the data may meet new ids; they must not crash serving, and
        until a warm start gives them rows (:meth:`grow_items`) they carry no signal.
        """
        inside = (item_ids >= 0) & (item_ids < self.config.n_item_rows)
        return torch.where(inside, item_ids, torch.zeros_like(item_ids))

    def embed(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``item_ids``; ids outside the table read the padding row (never crash)."""
        return self.item_embedding(self.known(item_ids))

    def cpu_state(self) -> dict[str, torch.Tensor]:
        """The weights as contiguous CPU tensors: what safetensors can write from any device."""
        return {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}

    def item_vectors(self) -> torch.Tensor:
        """[n_item_rows, d]: row i is item i (row 0, padding, is zero); MIPS searches these."""
        return self.item_embedding.weight

    def share_item_table(self, table: torch.Tensor) -> None:
        """Adopt ``table`` [n_item_rows, d] as the item table, without copying it.

        Serving loads a snapshot's matrix once and lets MIPS and the Generator/Ranker
        read the same bytes (a second 1M x 64 copy would double the swap's cost).
        """
        expected = (self.config.n_item_rows, self.config.dim)
        if tuple(table.shape) != expected:
            raise ValueError(f"item table {tuple(table.shape)} does not fit the model {expected}")
        self.item_embedding.weight = nn.Parameter(table, requires_grad=False)

    def grow_items(self, n_item_rows: int) -> None:
        """Enlarge the item table for ids seen for the first time (warm start on new data).

        Existing rows keep their trained values; new rows start at the same small random
        init as a fresh model, so they score near zero until trained (docs/model.md).
        """
        old = self.config.n_item_rows
        if n_item_rows <= old:
            return
        weight = self.item_embedding.weight
        extra = torch.randn(n_item_rows - old, weight.shape[1], device=weight.device) * 0.02
        table = nn.Embedding(n_item_rows, weight.shape[1], padding_idx=0).to(weight.device)
        with torch.no_grad():
            table.weight.copy_(torch.cat([weight.detach(), extra.to(weight.dtype)]))
        self.item_embedding = table
        self.config = replace(self.config, n_item_rows=n_item_rows)

    def fit_feature_ranges(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Remember the training range of the profile features (training sets it once)."""
        self.user_numeric_low.copy_(low)
        self.user_numeric_high.copy_(high)

    # -------------------------------------------------------------- generator
    def _fit(self, seq: torch.Tensor, length: int) -> torch.Tensor:
        """Keep the newest ``length`` ids (unknown ones as 0), left-padding shorter sequences."""
        return _newest(self.known(seq), length)

    def _profile(self, user: UserContext | None, batch: int) -> torch.Tensor | None:
        """The feature part of the query token U: pooled behaviours and the user's profile."""
        spec = self.config.inputs
        if not (spec.behaviors or spec.uses_user_features):
            return None
        if user is None:
            raise ValueError("this model reads user features: pass a UserContext")
        parts: list[torch.Tensor] = []
        if spec.behaviors:
            assert user.long_seq is not None and user.long_codes is not None
            seq = self._fit(user.long_seq, self.config.long_seq_len)
            flags = _newest(user.long_codes, self.config.long_seq_len)
            items = self.embed(seq)
            pooled = []
            for bit in range(len(spec.behaviors)):
                chosen = (((flags >> bit) & 1) * (seq > 0)).unsqueeze(-1).to(items.dtype)
                pooled.append((items * chosen).sum(1) / chosen.sum(1).clamp(min=1.0))
            parts.append(self.behavior_pool(torch.cat(pooled, dim=-1)))
        if spec.user_numeric:
            assert user.numeric is not None
            clipped = torch.maximum(
                torch.minimum(user.numeric, self.user_numeric_high), self.user_numeric_low
            )
            parts.append(self.user_numeric(clipped))
        if spec.user_categorical:
            assert user.categorical is not None
            parts.append(self.user_categories(user.categorical).sum(1))
        return torch.stack(parts).sum(0).reshape(batch, -1)

    def generator(
        self,
        short_seq: torch.Tensor,
        aux_candidates: torch.Tensor | None = None,
        user: UserContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the Generator; returns (states [B, Ls+1, d], aux scores [B, C] or None).

        ``states[:, t]`` for t < Ls is the causal output after history slot t (it predicts
        slot t+1, next-token prediction); ``states[:, -1]`` is the user query token U.
        ``aux_candidates`` [B, C] are appended to row b as candidate tokens (training only);
        the score of candidate j for row b is read from its own output token.
        """
        seq = self._fit(short_seq, self.config.short_seq_len)
        batch, length = seq.shape
        items = self.embed(seq)
        present = (seq > 0).unsqueeze(-1).float()
        mean_history = (items * present).sum(1) / present.sum(1).clamp(min=1.0)
        query = self.query_token + self.query_from_history(mean_history)
        profile = self._profile(user, batch)
        if profile is not None:
            query = query + profile
        if self.config.inputs.time_gaps:
            if user is None or user.long_codes is None:
                raise ValueError("this model reads time gaps: pass a UserContext with codes")
            # the short sequence is the long one's newest slots; one more gives the gaps
            items = items + self.gap_embedding(gap_buckets(_newest(user.long_codes, length + 1)))
        tokens = torch.cat([items, query.unsqueeze(1)], dim=1) + self.short_positions.weight
        hist = self.embed_drop(tokens)
        # causal mask over [history, U]; padding keys hidden; every token sees itself, so a
        # padding query never has an empty row (which would give NaN)
        valid = torch.cat([seq > 0, torch.ones(batch, 1, dtype=torch.bool, device=seq.device)], 1)
        causal = torch.ones(length + 1, length + 1, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(length + 1, dtype=torch.bool, device=seq.device)
        mask = ((causal & valid[:, None, :]) | eye).unsqueeze(1)
        cand = None
        if aux_candidates is not None:
            if not self.config.use_aux:
                raise ValueError("this model was built without the auxiliary path")
            cand = self.embed_drop(self.aux_input(self.embed(aux_candidates)))
        for block in self.blocks:
            hist, cand = block(hist, mask, cand)
        states = self.final_norm(hist)
        if cand is None:
            return states, None
        return states, self.aux_head(self.final_norm(cand)).squeeze(-1)

    def user_vector_of(self, states: torch.Tensor) -> torch.Tensor:
        """[B, d] MIPS query from the Generator's ``states`` [B, Ls+1, d]: the output at U,
        at the newest event's slot, or their mean (``config.user_vector``). The newest slot
        of a user without history is padding that sees only itself: one vector for every
        such user.
        """
        readout = self.config.user_vector
        if readout == "both":
            return (states[:, -1] + states[:, -2]) / 2
        return states[:, -2] if readout == "newest" else states[:, -1]

    def user_vectors(
        self, short_seq: torch.Tensor, user: UserContext | None = None
    ) -> torch.Tensor:
        """[B, d] MIPS query: the Generator's output where ``config.user_vector`` reads it."""
        states, _ = self.generator(short_seq, user=user)
        return self.user_vector_of(states)

    # ----------------------------------------------------------------- ranker
    def generator_scores(
        self, user_vectors: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """[B, K] MIPS scores ``user · item`` of ``candidates`` [B, K] (Stage 1's own order)."""
        return (user_vectors[:, None, :] * self.embed(candidates)).sum(-1)

    def rank_scores(
        self,
        long_seq: torch.Tensor,
        candidates: torch.Tensor,
        generator_scores: torch.Tensor | None = None,
        item_features: torch.Tensor | None = None,
        correction_weight: float | None = None,
        prior_weight: float | None = None,
    ) -> torch.Tensor:
        """[B, K] Ranker scores of ``candidates`` [B, K] given the long history [B, Ll].

        A residual Ranker (``config.ranker_residual``) adds its correction to
        ``generator_scores`` [B, K] (:meth:`generator_scores`: the candidates' MIPS scores),
        scaled by ``correction_weight``: None means ``config.ranker_weight``, the weight
        validation chose (what evaluation and serving rank by); the loss passes 1.0, so
        the Ranker always learns its whole correction.
        ``item_features`` [B, K, Fi] are the candidates' ``inputs.item_columns`` (encoded),
        as of the day before the prediction; required when the config names any.
        A model with a popularity prior adds ``prior_weight`` times the candidate's
        ``inputs.popularity_prior`` column (None: ``config.prior_weight``, what evaluation
        and serving rank by; the loss passes 0, so the Ranker never learns to lean on it).
        """
        if not self.config.use_ranker:
            raise ValueError("this model was built without the Ranker")
        if self.config.ranker_residual and generator_scores is None:
            raise ValueError("a residual Ranker needs the Generator's scores of the candidates")
        seq = self._fit(long_seq, self.config.long_seq_len)
        batch, d = seq.shape[0], self.config.dim
        history = self.ranker_history(self.embed(seq) + self.long_positions.weight)
        keys = torch.cat([self.ranker_null_key.expand(batch, 1, d), self.ranker_key(history)], 1)
        values = torch.cat(
            [self.ranker_null_value.expand(batch, 1, d), self.ranker_value(history)], 1
        )
        valid = torch.cat(
            [torch.ones(batch, 1, dtype=torch.bool, device=seq.device), seq > 0], dim=1
        )
        cand = self.embed(candidates)
        logits = (self.ranker_query(cand) @ keys.transpose(1, 2)) / math.sqrt(d)
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        attended = torch.softmax(logits, dim=-1) @ values
        spec = self.config.inputs
        prior = self.config.prior_weight if prior_weight is None else prior_weight
        if (spec.item_numeric or prior) and item_features is None:
            raise ValueError("this Ranker reads item features: pass item_features")
        parts = [attended, cand, attended * cand]
        if spec.item_numeric:
            assert item_features is not None
            parts.append(self.ranker_item_features(item_features[..., : len(spec.item_numeric)]))
        scores = self.ranker_mlp(torch.cat(parts, dim=-1)).squeeze(-1)
        if self.config.ranker_residual:
            assert generator_scores is not None
            weight = self.config.ranker_weight if correction_weight is None else correction_weight
            scores = generator_scores + weight * scores
        if prior and spec.popularity_prior is not None:
            assert item_features is not None
            column = spec.item_columns.index(spec.popularity_prior)
            scores = scores + prior * item_features[..., column]
        return scores


def _newest(seq: torch.Tensor, length: int) -> torch.Tensor:
    """The newest ``length`` columns of left-padded ``seq``, left-padding shorter ones with 0."""
    if seq.shape[1] >= length:
        return seq[:, seq.shape[1] - length :]
    return F.pad(seq, (length - seq.shape[1], 0))
