"""``recloop bench quality --text``: ID-only vs text-aware vs text-only SASRec+ and a content-only baseline, overall
and on cold-item targets (items without an event before the training cut).

Protocol (``models.text_items.cold_temporal_split``): the event policy's positives; two global time cuts; models
train on the events before the first (vocabulary = the items seen there; early stopping on each training user's
last pre-cut item); every later positive event of a user with an earlier one is a case (history = all the user's
earlier positives), in the validation window (between the cuts) or the test window (after the second). The window
share is the first of ``WINDOW_SHARES`` whose windows each hold ``MIN_COLD_TARGETS`` (200) cold targets: a choice
on counts, never on scores. Catalogue items without a pre-cut event are appended after the vocabulary as new items,
exactly as serving does (``serving.catalog``): a text-aware model scores them from its projection of their text
(``models.text_items.ItemTable``); the ID-only model cannot (-inf: 0 on them by construction, and it drops them
from histories); the content-only baseline ranks every item by the cosine of its text embedding with the mean
text embedding of the user's history. Full ranking over all catalogue items, seen items masked, pessimistic ties;
NDCG@K and HR@K overall, on warm and on cold targets, with the counts and a 95% cluster-bootstrap interval
(users resampled, seeded), and the paired interval of the text-aware minus content-only difference on cold targets.
``cold_among_new``: the same cold targets ranked among the new items only (``models.text_items.NewItemsOnly``, a
"new arrivals" slot), which separates ordering the new items from placing them against the warm catalogue.

Choices on validation only: each model's early-stopping epoch (the trainer), and the text-aware variant among the
"id+text" ones (the text path's standard fixes: DropoutNet's ID dropout, a LayerNorm with a learned gain started at
the ID scale, a learned cold ID vector, the ID part's expectation under the dropout outside training, or none):
the highest validation NDCG@K on cold targets among those whose validation NDCG@K overall is within 2% of the
ID-only model's, ties going to the higher overall (else the highest overall). The test window is read once per
model.
Text: all-MiniLM-L6-v2 over "title. genres" (``recloop.features.item_text``), through the embedding cache.
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
    NewItemsOnly,
    PaddedScorer,
    bootstrap_interval,
    cold_temporal_split,
    cold_vectors,
    subset,
    text_matrix,
)
from models.trainer import TrainConfig, train_model

logger = logging.getLogger(__name__)

#: The variants: report name -> (item_repr, extra config). "SASRec+ (id)" is the ID-only model of ``bench quality``.
#: The "id+text" ones are the text path with its standard fixes off and on (``models.contract``: ``id_dropout``,
#: DropoutNet; ``text_norm``, a LayerNorm whose learned gain starts at the ID embeddings' scale); the report's
#: text-aware model is chosen among them on validation (``choose_text_aware``).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "SASRec+ (id)": ("id", {}),
    "SASRec+ (id+text)": ("id+text", {}),
    "SASRec+ (id+text, id_dropout 0.5)": ("id+text", {"id_dropout": 0.5}),
    "SASRec+ (id+text, text_norm)": ("id+text", {"text_norm": True}),
    "SASRec+ (id+text, text_norm, id_dropout 0.5)": ("id+text", {"text_norm": True, "id_dropout": 0.5}),
    "SASRec+ (id+text, id_dropout 0.5, cold_id)": ("id+text", {"id_dropout": 0.5, "cold_id": True}),
    "SASRec+ (id+text, text_norm, id_dropout 0.5, cold_id)": ("id+text", {"text_norm": True, "id_dropout": 0.5,
                                                                          "cold_id": True}),
    "SASRec+ (id+text, text_norm, id_dropout 0.5, cold_id, id_expectation)": (
        "id+text", {"text_norm": True, "id_dropout": 0.5, "cold_id": True, "id_expectation": True}),
    "SASRec+ (text)": ("text", {}),
}
ID_ONLY = "SASRec+ (id)"
#: The largest relative drop of overall NDCG@K below the ID-only model a text-aware variant may show (issue 18).
MAX_RELATIVE_DROP = 0.02


def segment_metrics(per_case: dict[str, np.ndarray], cold: np.ndarray, users: np.ndarray, k: int, seed: int
                    ) -> dict[str, Any]:
    """NDCG@k and HR@k (mean over cases and 95% cluster-bootstrap interval over users) overall, on warm and on cold
    targets, with the case and user counts."""
    out: dict[str, Any] = {}
    for segment, mask in (("overall", np.ones_like(cold)), ("warm", ~cold), ("cold", cold)):
        row: dict[str, Any] = {"n": int(mask.sum()), "n_users": int(len(set(users[mask])))}
        for name in (f"ndcg@{k}", f"hr@{k}"):
            values = per_case[name][mask]
            row[name] = float(values.mean()) if len(values) else float("nan")
            row[f"{name}_ci95"] = list(bootstrap_interval(values, seed=seed, groups=users[mask]))
        out[segment] = row
    return out


def hit_concentration(hits: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """How many distinct target items the hits of a segment come from, and the share of the most-hit one: on a few
    hundred cold targets one hot new item near the users' common profile can carry a model's whole NDCG@K.

    Args:
        hits: (n,) 0/1 HR@K per case; targets: (n,) the cases' target item_idx.
    Returns:
        ``{"hits", "distinct_items", "top_item_share"}`` (``top_item_share`` nan without hits).
    """
    hit_items = np.asarray(targets)[np.asarray(hits) > 0]
    if not len(hit_items):
        return {"hits": 0, "distinct_items": 0, "top_item_share": float("nan")}
    _, counts = np.unique(hit_items, return_counts=True)
    return {"hits": int(len(hit_items)), "distinct_items": int(len(counts)),
            "top_item_share": float(counts.max() / len(hit_items))}


def choose_text_aware(valid: dict[str, dict[str, Any]], k: int) -> tuple[str, str]:
    """The text-aware ("id+text") variant to report, from validation segments only (see the module docstring).

    Args:
        valid: name -> validation segments (``segment_metrics``), with ``ID_ONLY`` among them when trained.
    Returns:
        (name, rule that chose it); ("", "") when no "id+text" variant was trained.
    """
    key = f"ndcg@{k}"
    aware = [n for n in valid if n.startswith("SASRec+ (id+text")]
    if not aware:
        return "", ""
    if ID_ONLY in valid:
        floor = (1 - MAX_RELATIVE_DROP) * valid[ID_ONLY]["overall"][key]
        within = [n for n in aware if valid[n]["overall"][key] >= floor]
        if within:
            # ties on cold NDCG (e.g. all 0) go to the better validation overall NDCG
            return (max(within, key=lambda n: (valid[n]["cold"][key], valid[n]["overall"][key])),
                    "best validation cold NDCG within 2% overall (ties: best overall)")
    return max(aware, key=lambda n: valid[n]["overall"][key]), "best validation overall NDCG (none within 2%)"


def run_text_bench(source: str, path: Path, *, share: float | None = None, epochs: int = 200, seed: int = 42,
                   k: int = 10, max_train_seconds: float | None = None, cache_dir: Path | None = None,
                   variants: list[str] | None = None, progress: bool = False,
                   threads: int | None = None) -> dict[str, Any]:
    """Train the variants and evaluate them and the content-only baseline under the cold-item protocol.

    Args:
        source / path: a ``recloop.sources`` dataset with an items table (titles, genres).
        share: each evaluation window's share of the events (None: chosen on cold-target counts).
        epochs / seed / k / max_train_seconds: training bound, seed, cut-off, wall-clock budget per model.
        cache_dir: where the embedding cache lives (default: a temporary folder).
        variants: names of ``VARIANTS`` (default all).
        threads: CPU threads for training (default: all cores).
    Returns:
        ``{"protocol", "models": {name: {"valid", "test": segments, ...}}, "checks"}``.
    Raises:
        KeyError: an unknown variant name.
    """
    from featurestore.materialize import load_text_encoder
    from featurestore.text import item_text_embeddings
    from recloop.settings import get_settings
    from recloop.sources import load_source

    names = variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise KeyError(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    settings = get_settings()
    frames = load_source(source, Path(path))
    events = settings.event_policy.positives(frames.events)
    items = frames.items
    cs = cold_temporal_split(events, items["item_id"].astype(str), share)
    vocab, new_ids = cs.vocab, cs.new_ids
    n_warm, n_all = len(vocab), len(vocab) + len(new_ids)
    logger.info("split %s", cs.protocol)
    with tempfile.TemporaryDirectory() as tmp:
        cache = (cache_dir or Path(tmp)) / "embedding_cache.parquet"
        t0 = time.perf_counter()
        texts = item_text_embeddings(items, load_text_encoder(cache_path=cache))
        embed_s = time.perf_counter() - t0
    d_text = len(next(iter(texts.values())))
    text_all = text_matrix(list(vocab.ids) + new_ids, texts, d_text)  # (n_all + 1, d_text)
    text_warm = text_all[: n_warm + 1]
    per_case: dict[str, np.ndarray] = {}

    def segments(scorer: Any, window: str) -> dict[str, Any]:
        eval_set, cold = (cs.valid, cs.valid_cold) if window == "valid" else (cs.test, cs.test_cold)
        res = evaluate(scorer, eval_set, n_items=n_all, k=k)
        if window == "test":
            per_case[name] = res["per_user"][f"ndcg@{k}"]
        out = segment_metrics(res["per_user"], cold, eval_set.user_ids, k, seed)
        out["cold"]["hits_by_item"] = hit_concentration(res["per_user"][f"hr@{k}"][cold], eval_set.targets[cold])
        # the same cold targets ranked among the new items only (a "new arrivals" slot): separates how well a
        # model orders new items from how high it puts them against the warm catalogue
        cold_set = subset(eval_set, cold)
        if len(cold_set):
            among = evaluate(NewItemsOnly(scorer, n_warm), cold_set, n_items=n_all, k=k)["per_user"]
            out["cold_among_new"] = segment_metrics(among, np.ones(len(cold_set), dtype=bool), cold_set.user_ids,
                                                    k, seed)["overall"]
        return out

    report: dict[str, Any] = {}
    name = "content-only"
    content = ContentScorer(text_all)
    report[name] = {"valid": segments(content, "valid"), "test": segments(content, "test")}
    for name in names:
        item_repr, extra = VARIANTS[name]
        params = {"n_items": n_warm, "max_seq_len": settings.max_seq_len, "item_repr": item_repr,
                  "d_text": 0 if item_repr == "id" else d_text, **extra}
        cfg = build_config("sasrec", **params)
        tcfg = TrainConfig(epochs=epochs, seed=seed, max_train_seconds=max_train_seconds, num_threads=threads)
        logger.info("training variant=%s", name)
        result = train_model(cs.split, vocab, cfg, tcfg, progress=progress,
                             item_text=None if item_repr == "id" else text_warm)
        model = result.model.cpu().eval()
        if item_repr == "id":
            scorer: Any = PaddedScorer(model, len(new_ids))
        else:
            scorer = ItemTable(model, cold_vectors(model, text_all[n_warm + 1:]))
        report[name] = {
            "item_repr": item_repr,
            "valid": segments(scorer, "valid"),
            "test": segments(scorer, "test"),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "train_seconds": result.train_seconds,
            "config": model.config_dict(),
        }
        logger.info("variant done model=%s valid_overall=%.4f valid_cold=%.4f", name,
                    report[name]["valid"]["overall"][f"ndcg@{k}"], report[name]["valid"]["cold"][f"ndcg@{k}"])
    key = f"ndcg@{k}"
    text_name, rule = choose_text_aware({n: r["valid"] for n, r in report.items() if n != "content-only"}, k)
    checks: dict[str, Any] = {"text_aware_variant": text_name, "chosen_on": f"validation {key}: {rule}"}
    if ID_ONLY in report and text_name:
        for seg in ("overall", "warm"):
            base, new = report[ID_ONLY]["test"][seg][key], report[text_name]["test"][seg][key]
            checks[f"text_aware_vs_id_{seg}_relative"] = (new - base) / base if base > 0 else float("nan")
        rel = checks["text_aware_vs_id_overall_relative"]
        checks["text_aware_within_2pct_of_id_overall"] = bool(rel >= -MAX_RELATIVE_DROP)
    if text_name:
        diff = per_case[text_name][cs.test_cold] - per_case["content-only"][cs.test_cold]
        checks["text_aware_minus_content_only_cold"] = float(diff.mean()) if len(diff) else float("nan")
        checks["text_aware_minus_content_only_cold_ci95"] = list(
            bootstrap_interval(diff, seed=seed, groups=cs.test.user_ids[cs.test_cold]))
        checks["text_aware_cold_above_content_only"] = (
            report[text_name]["test"]["cold"][key] > report["content-only"]["test"]["cold"][key])
        among = {n: report[n]["test"].get("cold_among_new", {}).get(key) for n in (text_name, "content-only")}
        if None not in among.values():
            checks["text_aware_cold_among_new_above_content_only"] = among[text_name] > among["content-only"]
    protocol = {
        **cs.protocol,
        "source": source,
        "event_policy": settings.event_policy.describe(),
        "k": k,
        "ranking": "full, over the whole catalogue (new items appended after the vocabulary)",
        "seen_filtered": True,
        "ties": "pessimistic",
        "interval": "95% percentile cluster bootstrap over users (2000 resamples, seeded); mean over cases",
        "model_selection": "early-stopping epoch on each training user's last pre-cut item; the text-aware variant "
                           "on the validation window (module docstring); the test window read once per model",
        "text": "all-MiniLM-L6-v2 over recloop.features.item_text (title. genres), L2-normalised",
        "d_text": d_text,
        "embed_seconds": embed_s,
        "max_seq_len": settings.max_seq_len,
        "epochs": epochs,
        "max_train_seconds": max_train_seconds,
        "seed": seed,
        "cpu_threads": threads or os.cpu_count() or 1,
    }
    return {"protocol": protocol, "models": report, "checks": checks}


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.text_quality --source movielens-100k --path DIR --json`` (ml-latest-small:
    ``--source movielens-latest``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="movielens-100k")
    parser.add_argument("--path", required=True)
    parser.add_argument("--share", type=float, default=None, help="each window's share (default: chosen on counts)")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-train-seconds", type=float, default=None)
    parser.add_argument("--variants", default="all", help="VARIANTS names separated by ';', or 'all'")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for training (default: all cores)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    names = None if args.variants == "all" else [v.strip() for v in args.variants.split(";") if v.strip()]
    report = run_text_bench(args.source, Path(args.path), share=args.share, epochs=args.epochs,
                            seed=args.seed, max_train_seconds=args.max_train_seconds, variants=names,
                            threads=args.threads)
    print(json.dumps(report, indent=None if args.json else 2, default=str))


if __name__ == "__main__":
    main()
