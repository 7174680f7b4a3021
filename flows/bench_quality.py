"""``recloop bench quality``: SASRec+ against every baseline on one leave-one-out split.

Reads the dataset (through ``recloop.sources.load_source`` when available, else the raw MovieLens
files), trains and evaluates each model with the same full-ranking protocol, and returns one
JSON-serialisable report: the protocol and, per model, test/validation metrics (seen items
filtered and unfiltered), train seconds, best epoch and sequences/s.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.baselines import EASE, ItemKNN, Markov1, MostPop
from models.metrics import evaluate
from models.sasrec import SASRecConfig
from models.sequences import build_sequences, leave_one_out
from models.trainer import TrainConfig, train_sasrec
from models.vocab import ItemVocabulary
from recloop.contract import coerce_events

logger = logging.getLogger(__name__)


def load_events(source: str, path: Path) -> pd.DataFrame:
    """Events in the contract for ``source`` at ``path`` (a local MovieLens copy).

    Raises:
        ValueError: unknown source; FileNotFoundError: the ratings file is missing.
    """
    try:
        from recloop.sources import load_source  # written concurrently by another engineer
    except ImportError:
        load_source = None
    if load_source is not None:
        loaded = load_source(source, path)
        return loaded["events"] if isinstance(loaded, dict) else getattr(loaded, "events", loaded)
    if source == "movielens-100k":
        raw = pd.read_csv(path / "u.data", sep="\t", names=["user_id", "item_id", "value", "timestamp"])
    elif source == "movielens-latest-small":
        raw = pd.read_csv(path / "ratings.csv").rename(
            columns={"userId": "user_id", "movieId": "item_id", "rating": "value"}
        )
    else:
        raise ValueError(f"source={source!r}; expected 'movielens-100k' or 'movielens-latest-small'")
    raw["event_type"] = "rating"
    return coerce_events(raw, default_source=source)


def load_item_genres(source: str, path: Path) -> dict[str, list[str]]:
    """item_id -> genres from the MovieLens item file (empty if the file is absent)."""
    if source == "movielens-100k" and (path / "u.item").exists():
        genres = pd.read_csv(path / "u.genre", sep="|", names=["name", "id"], encoding="latin-1")["name"].tolist()
        items = pd.read_csv(path / "u.item", sep="|", header=None, encoding="latin-1")
        flags = items.iloc[:, 5 : 5 + len(genres)].to_numpy().astype(bool)
        return {str(i): [g for g, f in zip(genres, row, strict=True) if f] for i, row in zip(items[0], flags, strict=True)}
    if (path / "movies.csv").exists():
        movies = pd.read_csv(path / "movies.csv")
        return {str(i): str(g).split("|") for i, g in zip(movies["movieId"], movies["genres"], strict=True)}
    return {}


def run_bench(
    source: str,
    path: Path,
    *,
    max_len: int = 200,
    epochs: int = 200,
    seed: int = 42,
    k: int = 10,
    progress: bool = False,
    model_config: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train/evaluate SASRec+ and MostPop, ItemKNN, EASE, Markov1 on a leave-one-out split.

    Returns:
        ``{"protocol": {...}, "models": {name: {"test": metrics, "valid": metrics,
        "test_unfiltered": metrics, "valid_unfiltered": metrics, "train_seconds", ...}}}``.
    """
    events = load_events(source, Path(path))
    vocab = ItemVocabulary.from_ids(events["item_id"])
    split = leave_one_out(build_sequences(events, vocab))
    n_items = len(vocab)
    counts = np.bincount(np.concatenate(list(split.train.values())), minlength=n_items + 1)
    genre_of = load_item_genres(source, Path(path))
    item_genres = {i + 1: genre_of.get(item_id, []) for i, item_id in enumerate(vocab.ids)}
    n_threads = os.cpu_count() or 1

    def measure(model: Any) -> dict[str, Any]:
        out = {}
        for name, eval_set in (("test", split.test), ("valid", split.valid)):
            for filtered in (True, False):
                res = evaluate(
                    model, eval_set, n_items=n_items, k=k, exclude_seen=filtered, item_counts=counts,
                    n_train_users=len(split.train), item_genres=item_genres,
                )
                out[name if filtered else f"{name}_unfiltered"] = res["metrics"]
        return out

    report: dict[str, Any] = {}
    baselines = {
        "MostPop": lambda: MostPop(),
        "ItemKNN": lambda: ItemKNN(k_neighbours=100),
        "EASE": lambda: EASE(l2=500.0),
        "Markov1": lambda: Markov1(),
    }
    for name, make in baselines.items():
        t0 = time.perf_counter()
        model = make().fit(split.train, n_items)
        report[name] = {"train_seconds": time.perf_counter() - t0, **measure(model)}
        logger.info("baseline done model=%s test_ndcg=%.4f", name, report[name]["test"][f"ndcg@{k}"])

    mcfg = SASRecConfig(n_items=n_items, **{"max_seq_len": max_len, **(model_config or {})})
    tcfg = TrainConfig(**{"epochs": epochs, "seed": seed, **(train_config or {})})
    result = train_sasrec(split, vocab, mcfg, tcfg, progress=progress)
    report["SASRec+"] = {
        "train_seconds": result.train_seconds,
        "seconds_to_best_epoch": result.seconds_to_best,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seqs_per_s": result.seqs_per_s,
        "device": result.device,
        "config": mcfg.to_dict(),
        "train_config": result.train_config,
        **measure(result.model),
    }
    protocol = {
        **split.protocol,
        "k": k,
        "ranking": "full",
        "seen_filtered": True,
        "unfiltered_also_reported": True,
        "ties": "pessimistic",
        "max_len": max_len,
        "seed": seed,
        "source": source,
        "n_items": n_items,
        "n_train_interactions": int(counts.sum()),
        "cpu_threads": n_threads,
    }
    return {"protocol": protocol, "models": report}
