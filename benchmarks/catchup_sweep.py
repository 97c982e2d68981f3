"""Global temporal split scores of one fitted model under several catch-ups to T_test.

``grank offline-eval --protocol gts`` fits GRank on the events up to T_val with early
stopping, then catches up on the events between T_val and T_test (as many epochs at
``train.finetune_lr`` as validation chooses among ``train.catchup_epochs``) before it is
scored on the events after T_test. The targets sit right after T_test, so how much of
the freshest period the model has learned may matter as much as the fit. This script
fits once and scores every catch-up setting from the same fitted weights, side by side,
after the length ``offline-eval`` would choose among ``--epochs`` (training/train.py
``choose_catch_up``, at ``train.finetune_lr``):

    GRANK_DATA_ROOT=<root> GRANK_TRAIN__DIM=128 GRANK_TRAIN__N_LAYERS=3 \\
        .venv/bin/python benchmarks/catchup_sweep.py --epochs 0,1,2,4 --lrs 5e-4,1e-3

``--user-vectors query,newest,both`` repeats each row with the user vector read at U, at
the newest event's slot and at their mean (``GRankConfig.user_vector``; without the
option, where the fit's validation chose), from the same fitted weights.

Each row is what ``grank offline-eval --protocol gts --variants grank`` reports with
``GRANK_TRAIN__CATCHUP_EPOCHS`` and ``GRANK_TRAIN__FINETUNE_LR`` set to the row's values
(the same seed and the same fit, unless a ``--minutes`` budget ends the fit; every
fit, the catch-up included, draws its batches from its own seeded stream, so trying
the choices first does not move the rows).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from grank.cli.train import offline_job
from grank.config import Settings
from training.model import GRank
from training.offline import HISTORY_FILTER, gts_scores, gts_variant, load
from training.train import (
    catch_up,
    choose_catch_up,
    fit_to_cutoff,
    pick_device,
    seed_everything,
)

TARGETS = ("last", "successive")


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", default="0,1,2,4", help="Catch-up epochs to compare.")
    parser.add_argument("--lrs", default="5e-4,1e-3", help="Catch-up learning rates to compare.")
    parser.add_argument("--minutes", type=float, help="The fit's budget (default: none).")
    parser.add_argument(
        "--fitted",
        type=Path,
        help="Weights of the fit to T_val: read from here if the file exists (no fit), else"
        " written here after the fit.",
    )
    parser.add_argument(
        "--user-vectors",
        default="",
        help="Where to read the user vector, comma-separated (query, newest, both; default:"
        " the configured one).",
    )
    args = parser.parse_args()
    epochs = [int(value) for value in _floats(args.epochs)]
    lrs = _floats(args.lrs)

    job = offline_job(Settings(), 0.9, args.minutes, next_day_windows=False)
    device = pick_device()
    data = load(job, device)
    seed_everything(job.fit.seed)
    model, make_loss, spec, config, inputs = gts_variant(job, data, "grank", device)
    assert isinstance(model, GRank)
    if args.fitted and args.fitted.is_file():
        saved = torch.load(args.fitted, weights_only=True)
        model.load_state_dict(saved["weights"])
        chosen_by_validation = {k: saved[k] for k in ("ranker_weight", "user_vector") if k in saved}
        model.config = replace(model.config, **chosen_by_validation)
    else:
        started = time.perf_counter()
        result = fit_to_cutoff(
            model, make_loss, data.timelines, data.split, spec, config, device, inputs
        )
        print(
            f"fit: best validation {result.best_score:.4f} at epoch {result.best_epoch}"
            f" ({result.stop_reason}; {time.perf_counter() - started:.0f}s); user vector"
            f" {model.config.user_vector} {result.user_vector_scores}"
        )
        if args.fitted:
            # what validation chose (the Ranker weight, the readout) is part of the fitted model
            saved = {
                "weights": model.state_dict(),
                "ranker_weight": model.config.ranker_weight,
                "user_vector": model.config.user_vector,
            }
            torch.save(saved, args.fitted)
    fitted = copy.deepcopy(model.state_dict())
    chosen, trial = choose_catch_up(
        model,
        make_loss,
        data.timelines,
        data.split,
        spec,
        job.catchup,
        tuple(epochs),
        device,
        inputs,
    )
    print(f"validation's choice among {epochs} epochs at {job.catchup.lr:g}: {chosen} ({trial})")
    readouts = [part for part in args.user_vectors.split(",") if part] or [model.config.user_vector]
    header = (
        "catch-up             vector  filter       stage      Last N@10  HR@10  Succ N@10  HR@10"
    )
    print(header)
    for lr in lrs:
        for count in epochs:
            if count == 0 and lr != lrs[0]:
                continue  # no catch-up reads the same whatever its rate
            for readout in readouts:
                model.load_state_dict(fitted)
                # the catch-up's Ranker learns on the list this vector retrieves
                model.config = replace(model.config, user_vector=readout)
                catchup = replace(job.catchup, max_epochs=count, lr=lr)
                catch_up(
                    model, make_loss, data.timelines, data.split, spec, catchup, device, inputs
                )
                scores = gts_scores(model, data, spec, inputs, device)
                for name, suffix in (("serving's", ""), ("literature's", HISTORY_FILTER)):
                    for stage in ("rank", "generator"):
                        last, successive = (
                            scores[t + suffix][f"{stage}/filtered"] for t in TARGETS
                        )
                        print(
                            f"{count} epochs at {lr:<8g}  {readout:6}  {name:12} {stage:9}"
                            f"  {last['ndcg@10']:.4f}  {last['recall@10']:.4f}"
                            f"    {successive['ndcg@10']:.4f}  {successive['recall@10']:.4f}",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
