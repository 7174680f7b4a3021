"""Choose GRU4Rec's settings on the leave-one-out VALIDATION split (the test split is never read).

Trains ``models.gru4rec.GRU4Rec`` once per setting of a small grid (d_model, n_layers, dropout, lr)
with the same trainer and early stopping as SASRec (AdamW, full-softmax cross-entropy, patience on
validation NDCG@10) and prints one JSON document on stdout: the protocol, the shared training knobs
and, per setting, its best validation NDCG@10 / HR@10, best epoch, epochs run and seconds. Progress
goes to stderr through logging. The chosen values become ``GRU4RecConfig``'s defaults and
``GRU4REC_TRAIN``.

Usage::

    .venv/bin/python -m bench.tune_gru4rec --path ../shared/data/ml-100k > gru4rec_tune.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from models.gru4rec import GRU4RecConfig
from models.sequences import build_sequences, leave_one_out
from models.trainer import TrainConfig, train_model
from models.vocab import ItemVocabulary
from recloop.settings import get_settings

logger = logging.getLogger(__name__)

#: The settings tried, in order: dropout and width around the SASRec defaults, then a lower lr.
GRID: list[dict[str, Any]] = [
    {"d_model": 64, "n_layers": 1, "dropout": 0.1, "lr": 3e-3},
    {"d_model": 64, "n_layers": 1, "dropout": 0.3, "lr": 3e-3},
    {"d_model": 64, "n_layers": 1, "dropout": 0.5, "lr": 3e-3},
    {"d_model": 128, "n_layers": 1, "dropout": 0.3, "lr": 3e-3},
    {"d_model": 128, "n_layers": 1, "dropout": 0.5, "lr": 3e-3},
    {"d_model": 64, "n_layers": 1, "dropout": 0.3, "lr": 1e-3},
]


def tune(
    source: str,
    path: Path,
    grid: list[dict[str, Any]],
    *,
    max_len: int = 50,
    epochs: int = 100,
    patience: int = 8,
    batch_size: int = 64,
    seed: int = 42,
    max_seconds_per_setting: float | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Train one GRU4Rec per setting and report validation metrics (no test evaluation).

    Args:
        source: a ``recloop.sources`` name, e.g. ``"movielens-100k"``.
        path: the local copy of that dataset.
        grid: settings, each with ``lr`` and ``GRU4RecConfig`` fields (``n_items``/``max_seq_len`` excluded).
        max_len: ``max_seq_len`` of every model.
        epochs, patience, batch_size, seed: ``TrainConfig`` knobs shared by every setting.
        max_seconds_per_setting: wall-clock cap of one training run (None: no cap).
        num_threads: CPU threads (None: all cores).
    Returns:
        ``{"source", "selection", "protocol", "train", "results", "interrupted", "best"}``; ``best``
        is the setting with the highest validation NDCG@10; ``interrupted`` is True when a Ctrl-C
        stopped the grid early (``results`` then holds the settings that finished).
    Raises:
        ValueError: empty grid or a setting without ``lr``.
    """
    from recloop.sources import load_source

    if not grid:
        raise ValueError("grid is empty; expected at least one setting")
    for setting in grid:
        if "lr" not in setting:
            raise ValueError(f"setting={setting} has no 'lr'; expected lr and GRU4RecConfig fields")
    policy = get_settings().event_policy
    events = policy.positives(load_source(source, path).events)  # positives only (recloop.policy)
    vocab = ItemVocabulary.from_ids(events["item_id"])
    split = leave_one_out(build_sequences(events, vocab))
    shared = {
        "epochs": epochs,
        "patience": patience,
        "batch_size": batch_size,
        "seed": seed,
        "max_train_seconds": max_seconds_per_setting,
        "num_threads": num_threads,
        "device": "cpu",
    }
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        for setting in grid:
            arch = {k: v for k, v in setting.items() if k != "lr"}
            model_config = GRU4RecConfig(n_items=len(vocab), max_seq_len=max_len, **arch)
            train_config = TrainConfig(lr=setting["lr"], **shared)
            logger.info("setting start %s", setting)
            t0 = time.perf_counter()
            result = train_model(split, vocab, model_config, train_config, progress=False)
            best_row = next(row for row in result.history if row["epoch"] == result.best_epoch)
            row = {
                **setting,
                "val_ndcg@10": round(result.best_val_ndcg, 5),
                "val_hr@10": round(best_row["val_hr@10"], 5),
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "seconds_to_best": round(result.seconds_to_best, 1),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            logger.info("setting done %s", row)
            results.append(row)
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: report the settings finished so far
        if not results:
            raise
        interrupted = True
        logger.warning("interrupted after %d of %d settings", len(results), len(grid))
    best = max(results, key=lambda r: r["val_ndcg@10"])
    return {
        "source": source,
        "selection": "best validation NDCG@10 (leave-one-out); test not evaluated",
        "protocol": {**split.protocol, "event_policy": policy.describe(), "n_items": len(vocab),
                     "max_seq_len": max_len},
        "train": shared,
        "results": results,
        "interrupted": interrupted,
        "best": best,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: run the grid and print the JSON report on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, required=True, help="local copy of the dataset")
    parser.add_argument("--source", default="movielens-100k")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-seconds-per-setting", type=float, default=None, help="wall-clock cap per run")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1: robust when other jobs share a small machine)"
    )
    parser.add_argument("--only", type=int, nargs="*", default=None, help="indices of GRID to run")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    grid = GRID if args.only is None else [GRID[i] for i in args.only]
    report = tune(
        args.source,
        args.path,
        grid,
        max_len=args.max_len,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        seed=args.seed,
        max_seconds_per_setting=args.max_seconds_per_setting,
        num_threads=args.threads,
    )
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
