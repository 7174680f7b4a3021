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

# Tuned on ML-100K validation NDCG@10 (not test): small, regularised, fast on 2 CPU cores.
DEFAULT_MODEL: dict[str, Any] = {"d_model": 64, "n_heads": 1, "n_layers": 2, "dropout": 0.3}
DEFAULT_TRAIN: dict[str, Any] = {"lr": 3e-3, "batch_size": 64, "patience": 8}


def load_dataset(source: str, path: Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Contract events and item_id -> genres for ``source`` at ``path`` (a local copy).

    Uses ``recloop.sources.load_source``; falls back to reading raw MovieLens files when that
    module is not installed.

    Raises:
        ValueError: unknown source; FileNotFoundError: the ratings file is missing.
    """
    try:
        from recloop.sources import load_source
    except ImportError:
        load_source = None
    if load_source is not None:
        frames = load_source(source, path)
        genres = {
            str(i): list(g) for i, g in zip(frames.items["item_id"], frames.items["genres"], strict=True)
        }
        return frames.events, genres
    if source == "movielens-100k":
        raw = pd.read_csv(path / "u.data", sep="\t", names=["user_id", "item_id", "value", "timestamp"])
        names = pd.read_csv(path / "u.genre", sep="|", names=["name", "id"], encoding="latin-1")[
            "name"
        ].tolist()
        items = pd.read_csv(path / "u.item", sep="|", header=None, encoding="latin-1")
        flags = items.iloc[:, 5 : 5 + len(names)].to_numpy().astype(bool)
        genres = {
            str(i): [g for g, f in zip(names, row, strict=True) if f]
            for i, row in zip(items[0], flags, strict=True)
        }
    else:
        raise ValueError(f"source={source!r}; without recloop.sources only 'movielens-100k' is readable")
    raw["event_type"] = "rating"
    return coerce_events(raw, default_source=source), genres


def run_bench(
    source: str,
    path: Path,
    *,
    max_len: int = 50,
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
    events, genre_of = load_dataset(source, Path(path))
    vocab = ItemVocabulary.from_ids(events["item_id"])
    split = leave_one_out(build_sequences(events, vocab))
    n_items = len(vocab)
    counts = np.bincount(np.concatenate(list(split.train.values())), minlength=n_items + 1)
    item_genres = {i + 1: genre_of.get(item_id, []) for i, item_id in enumerate(vocab.ids)}
    n_threads = os.cpu_count() or 1

    def measure(model: Any) -> dict[str, Any]:
        out = {}
        for name, eval_set in (("test", split.test), ("valid", split.valid)):
            for filtered in (True, False):
                res = evaluate(
                    model,
                    eval_set,
                    n_items=n_items,
                    k=k,
                    exclude_seen=filtered,
                    item_counts=counts,
                    n_train_users=len(split.train),
                    item_genres=item_genres,
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

    mcfg = SASRecConfig(n_items=n_items, **{**DEFAULT_MODEL, "max_seq_len": max_len, **(model_config or {})})
    tcfg = TrainConfig(**{**DEFAULT_TRAIN, "epochs": epochs, "seed": seed, **(train_config or {})})
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


def print_table(report: dict[str, Any]) -> None:
    """Render the bench report as a rich table (test metrics filtered and unfiltered, timings)."""
    from rich.console import Console
    from rich.table import Table

    p = report["protocol"]
    k = p["k"]
    table = Table(
        title=f"{p['source']} {p['split']} | full ranking, K={k}, seen filtered | "
        f"users={p['n_eval_users']} items={p['n_items']} max_len={p['max_len']} seed={p['seed']}"
    )
    for col in (
        "model",
        f"NDCG@{k}",
        f"HR@{k}",
        f"MRR@{k}",
        f"cov@{k}",
        f"val NDCG@{k}",
        f"NDCG@{k} unfilt.",
        "train s",
        "best epoch",
        "seq/s",
    ):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, m in report["models"].items():
        t = m["test"]
        table.add_row(
            name,
            f"{t[f'ndcg@{k}']:.4f}",
            f"{t[f'hr@{k}']:.4f}",
            f"{t[f'mrr@{k}']:.4f}",
            f"{t[f'coverage@{k}']:.3f}",
            f"{m['valid'][f'ndcg@{k}']:.4f}",
            f"{m['test_unfiltered'][f'ndcg@{k}']:.4f}",
            f"{m['train_seconds']:.1f}",
            str(m.get("best_epoch", "-")),
            f"{m['seqs_per_s']:.0f}" if "seqs_per_s" in m else "-",
        )
    Console().print(table)
