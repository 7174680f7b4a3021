"""``recloop bench quality --text``: ID-only vs text-aware vs text-only SASRec+ and a content-only baseline, overall
and on cold-item targets (items first seen after a global time cut).

Protocol (``models.text_items.cold_temporal_split``): the event policy's positives; one time cut at a quantile of
the timestamps; training and validation on the past only (vocabulary = items seen before the cut; validation
target = each user's last past item); test target = each user's first event after the cut, on any catalogue
item. Items first seen after the cut are appended after the vocabulary as new items, exactly as serving does
(``serving.catalog``): a text-aware model scores them from its projection of their text
(``models.text_items.ItemTable``); the ID-only model cannot (-inf: 0 on them by construction); the content-only
baseline ranks every item by the cosine of its text embedding with the mean text embedding of the user's
history. Full ranking over all catalogue items, seen items masked, pessimistic ties; NDCG@K and HR@K overall, on
warm targets and on cold targets, with a 95% percentile bootstrap interval over users (seeded) and the counts.
Text: all-MiniLM-L6-v2 over "title. genres" (``recloop.features.item_text``), through the embedding cache.
The only choice made on data is each model's early-stopping epoch, on validation NDCG@K; nothing looks at test.
Prints one JSON document with ``--json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.factory import build_config
from models.metrics import evaluate
from models.text_items import (
    ContentScorer,
    ItemTable,
    PaddedScorer,
    bootstrap_interval,
    cold_temporal_split,
    cold_vectors,
    text_matrix,
)
from models.trainer import TrainConfig, train_model

logger = logging.getLogger(__name__)

#: The variants: report name -> (item_repr, extra config). "SASRec+" is the ID-only model of ``bench quality``.
#: The two "id+text" variants are the standard fix of a missing ID part (DropoutNet's ID dropout) on and off; the
#: report's text-aware model is the one with the higher validation NDCG@K (``checks["text_aware_variant"]``).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "SASRec+ (id)": ("id", {}),
    "SASRec+ (id+text)": ("id+text", {}),
    "SASRec+ (id+text, id_dropout 0.5)": ("id+text", {"id_dropout": 0.5}),
    "SASRec+ (text)": ("text", {}),
}


def segment_metrics(per_user: dict[str, np.ndarray], cold: np.ndarray, k: int, seed: int) -> dict[str, Any]:
    """NDCG@k and HR@k (mean and 95% bootstrap interval) overall, on warm and on cold targets, with counts."""
    out: dict[str, Any] = {}
    for segment, mask in (("overall", np.ones_like(cold)), ("warm", ~cold), ("cold", cold)):
        row: dict[str, Any] = {"n": int(mask.sum())}
        for name in (f"ndcg@{k}", f"hr@{k}"):
            values = per_user[name][mask]
            row[name] = float(values.mean()) if len(values) else float("nan")
            row[f"{name}_ci95"] = list(bootstrap_interval(values, seed=seed))
        out[segment] = row
    return out


def run_text_bench(source: str, path: Path, *, quantile: float = 0.9, epochs: int = 200, seed: int = 42,
                   k: int = 10, max_train_seconds: float | None = None, cache_dir: Path | None = None,
                   variants: list[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Train the variants and evaluate them and the content-only baseline under the cold-item protocol.

    Args:
        source / path: a ``recloop.sources`` dataset with an items table (titles, genres).
        quantile: the time cut.
        epochs / seed / k / max_train_seconds: training bound, seed, cut-off, wall-clock budget per model.
        cache_dir: where the embedding cache lives (default: a temporary folder).
        variants: names of ``VARIANTS`` (default all).
    Returns:
        ``{"protocol": {...}, "models": {name: {"test": segments, "valid": {...}, "train_seconds", ...}}}``.
    """
    from featurestore.materialize import load_text_encoder
    from featurestore.text import item_text_embeddings
    from recloop.settings import get_settings
    from recloop.sources import load_source

    settings = get_settings()
    frames = load_source(source, Path(path))
    events = settings.event_policy.positives(frames.events)
    items = frames.items
    split, vocab, new_ids, cold = cold_temporal_split(events, items["item_id"].astype(str), quantile)
    n_warm, n_all = len(vocab), len(vocab) + len(new_ids)
    with tempfile.TemporaryDirectory() as tmp:
        cache = (cache_dir or Path(tmp)) / "embedding_cache.parquet"
        t0 = time.perf_counter()
        texts = item_text_embeddings(items, load_text_encoder(cache_path=cache))
        embed_s = time.perf_counter() - t0
    d_text = len(next(iter(texts.values())))
    text_all = text_matrix(list(vocab.ids) + new_ids, texts, d_text)  # (n_all + 1, d_text)
    text_warm = text_all[: n_warm + 1]

    def test_metrics(scorer: Any) -> dict[str, Any]:
        res = evaluate(scorer, split.test, n_items=n_all, k=k)
        return segment_metrics(res["per_user"], cold, k, seed)

    report: dict[str, Any] = {}
    content = ContentScorer(text_all)
    report["content-only"] = {"test": test_metrics(content),
                              "valid": evaluate(ContentScorer(text_warm), split.valid, n_items=n_warm, k=k)["metrics"]}
    for name in variants or list(VARIANTS):
        item_repr, extra = VARIANTS[name]
        params = {"n_items": n_warm, "max_seq_len": settings.max_seq_len, "item_repr": item_repr,
                  "d_text": 0 if item_repr == "id" else d_text, **extra}
        cfg = build_config("sasrec", **params)
        tcfg = TrainConfig(epochs=epochs, seed=seed, max_train_seconds=max_train_seconds)
        logger.info("training variant=%s", name)
        result = train_model(split, vocab, cfg, tcfg, progress=progress,
                             item_text=None if item_repr == "id" else text_warm)
        model = result.model.cpu().eval()
        if item_repr == "id":
            scorer: Any = PaddedScorer(model, len(new_ids))
        else:
            scorer = ItemTable(model, cold_vectors(model, text_all[n_warm + 1:]))
        report[name] = {
            "item_repr": item_repr,
            "test": test_metrics(scorer),
            "valid": evaluate(model, split.valid, n_items=n_warm, k=k)["metrics"],
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "train_seconds": result.train_seconds,
            "config": model.config_dict(),
        }
        logger.info("variant done model=%s overall_ndcg=%.4f cold_ndcg=%.4f", name,
                    report[name]["test"]["overall"][f"ndcg@{k}"], report[name]["test"]["cold"][f"ndcg@{k}"])
    ids_name = "SASRec+ (id)"
    aware = [n for n in report if n.startswith("SASRec+ (id+text")]
    text_name = max(aware, key=lambda n: report[n]["valid"][f"ndcg@{k}"]) if aware else ""
    checks: dict[str, Any] = {"text_aware_variant": text_name, "chosen_on": f"validation ndcg@{k}"}
    if ids_name in report and text_name:
        key = f"ndcg@{k}"
        for seg in ("overall", "warm"):
            base, new = report[ids_name]["test"][seg][key], report[text_name]["test"][seg][key]
            checks[f"text_aware_vs_id_{seg}_relative"] = (new - base) / base if base > 0 else float("nan")
        checks["text_aware_cold_above_content_only"] = (
            report[text_name]["test"]["cold"][key] > report["content-only"]["test"]["cold"][key])
    protocol = {
        **split.protocol,
        "source": source,
        "event_policy": settings.event_policy.describe(),
        "k": k,
        "ranking": "full, over the whole catalogue (new items appended after the vocabulary)",
        "seen_filtered": True,
        "ties": "pessimistic",
        "interval": "95% percentile bootstrap over users (2000 resamples, seeded)",
        "model_selection": "early-stopping epoch on validation NDCG@K (past only); no test-based choice",
        "text": "all-MiniLM-L6-v2 over recloop.features.item_text (title. genres), L2-normalised",
        "d_text": d_text,
        "embed_seconds": embed_s,
        "max_seq_len": settings.max_seq_len,
        "epochs": epochs,
        "max_train_seconds": max_train_seconds,
        "seed": seed,
        "cpu_threads": os.cpu_count() or 1,
    }
    return {"protocol": protocol, "models": report, "checks": checks}


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.text_quality --source movielens-100k --path DIR --json`` (ml-latest-small:
    ``--source movielens-latest``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="movielens-100k")
    parser.add_argument("--path", required=True)
    parser.add_argument("--quantile", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-train-seconds", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    report = run_text_bench(args.source, Path(args.path), quantile=args.quantile, epochs=args.epochs,
                            seed=args.seed, max_train_seconds=args.max_train_seconds)
    print(json.dumps(report, indent=None if args.json else 2, default=str))


if __name__ == "__main__":
    main()
