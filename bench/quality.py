"""``recloop bench quality``: every registered sequential model against every baseline on one split.

Reads the dataset through ``recloop.sources.load_source``, trains each model of ``models.factory``
(SASRec+, GRU4Rec, ...) with its validation-tuned defaults and fits each baseline of
``models.baselines.BASELINES``, evaluates all with the same full-ranking leave-one-out protocol, and
returns one JSON-serialisable report: the protocol and, per model, test/validation metrics (seen
items filtered and unfiltered), train seconds, best epoch and sequences/s. Keys are stable:
``{"protocol": {...}, "models": {name: {...}}}``; later issues add models and keys, never rename.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.baselines import BASELINES
from models.factory import MODELS, build_config, model_class
from models.metrics import evaluate
from models.sequences import build_sequences, leave_one_out
from models.trainer import TrainConfig, train_model
from models.vocab import ItemVocabulary
from recloop.settings import get_settings
from recloop.sources import load_source

logger = logging.getLogger(__name__)

#: How each sequential model is named in the report (the field's names; SASRec with full CE is "SASRec+").
DISPLAY_NAMES = {"sasrec": "SASRec+", "gru4rec": "GRU4Rec"}


def load_dataset(source: str, path: Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Contract events and item_id -> genres for ``source`` at ``path`` (a local copy).

    Raises:
        ValueError: unknown source; FileNotFoundError: the data is missing.
    """
    frames = load_source(source, path)
    genres = {str(i): list(g) for i, g in zip(frames.items["item_id"], frames.items["genres"], strict=True)}
    return frames.events, genres


def run_bench(
    source: str,
    path: Path,
    *,
    models: list[str] | None = None,
    max_len: int | None = None,
    epochs: int = 200,
    seed: int = 42,
    k: int = 10,
    progress: bool = False,
    model_config: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train/evaluate the sequential models and MostPop, ItemKNN, EASE, Markov1 on a leave-one-out split.

    Args:
        source / path: the dataset (``recloop.sources``).
        models: names in ``models.factory.MODELS`` (default: all of them).
        max_len: every model's ``max_seq_len`` (default ``settings.max_seq_len``).
        epochs / seed / k: training bound, seed, cut-off K.
        model_config / train_config: overrides applied to every sequential model.
    Returns:
        ``{"protocol": {...}, "models": {name: {"test": metrics, "valid": metrics,
        "test_unfiltered": metrics, "valid_unfiltered": metrics, "train_seconds", ...}}}``.
    Raises:
        ValueError: an unknown model name.
    """
    names = list(MODELS) if models is None else models
    for name in names:
        model_class(name)  # fails before any training on an unknown name
    max_len = max_len or get_settings().max_seq_len
    events, genre_of = load_dataset(source, Path(path))
    policy = get_settings().event_policy
    events = policy.positives(events)  # histories and targets: the policy's positives (recloop.policy)
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
    for name, make in BASELINES.items():
        t0 = time.perf_counter()
        model = make().fit(split.train, n_items)
        report[name] = {"train_seconds": time.perf_counter() - t0, **measure(model)}
        logger.info("baseline done model=%s test_ndcg=%.4f", name, report[name]["test"][f"ndcg@{k}"])

    for name in names:
        cls = model_class(name)
        mcfg = build_config(name, **{"n_items": n_items, "max_seq_len": max_len, **(model_config or {})})
        tcfg = TrainConfig(**{**cls.train_defaults, "epochs": epochs, "seed": seed, **(train_config or {})})
        result = train_model(split, vocab, mcfg, tcfg, progress=progress)
        report[DISPLAY_NAMES.get(name, name)] = {
            "model_class": name,
            "train_seconds": result.train_seconds,
            "seconds_to_best_epoch": result.seconds_to_best,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "seqs_per_s": result.seqs_per_s,
            "device": result.device,
            "config": result.model.config_dict(),
            "train_config": result.train_config,
            **measure(result.model),
        }
    protocol = {
        **split.protocol,
        "event_policy": policy.describe(),
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
