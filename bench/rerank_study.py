"""``python -m bench.rerank_study --json``: diversity re-ranking on ml-100k, its trade-off curves and its cost.

Protocol (stated in the report's ``protocol``):

1. Data: ml-100k through ``recloop.sources`` (the event policy's positives), leave-one-out split
   (``models.sequences.leave_one_out``); genres from the item table.
2. Model: a small seeded SASRec+ (``models.factory`` defaults but ``d_model``/epochs/time budget
   bounded, ``--seconds``), early-stopped on validation NDCG@10 by the trainer.
3. Candidates: for every evaluated user, the top N = 100 of the full ranking after masking the
   history (``models.ranking``), re-ranked by MMR (λ = diversity) and by DPP greedy MAP
   (θ = 1 - diversity) over the model's item embeddings (``models.rerank``), for a grid of diversity
   values. Per point: NDCG@10 of the held-out item in the re-ranked list (0 when it is not in the
   candidates), ILD@10 by genres (Jaccard distance) and by embeddings (cosine distance), coverage@10
   and freshness@10 (items first seen in the last ``--fresh-days`` days before the data's newest
   timestamp).
4. Selection: on the **validation** split, the default diversity of each re-ranker is the largest grid
   value whose NDCG@10 stays within ``--max-ndcg-drop`` (relative) of the model's own order; the test
   split is evaluated once, at that value (and at 0 for reference).
5. Comparison at equal NDCG@10: each validation curve (ILD as a function of NDCG@10) is linearly
   interpolated on a common grid of NDCG@10 levels inside both curves' ranges; the report gives the
   mean ILD difference DPP − MMR there (absolute and relative), by genres and by embeddings.
6. Overheads, in-process (``bench.exposure_cost.bench_core``: the serving core over ml-100k, one torch
   thread, exposure log off): blocks of recommends alternating off/on (order flipped each repetition),
   diversity on (N = 100, k = 10; MMR and DPP) and ``explain``; the median over repetitions of the
   per-block p50 difference, in ms (goal <= 1 ms each).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.metrics import fresh_items
from models.rerank import RERANKERS
from models.tradeoff import (  # noqa: F401 - re-exported: the study's functions live in the learning layer
    GRID,
    N_CANDIDATES,
    K,
    at_equal_ndcg,
    choose_default,
    curve_point,
    curves,
    rerank_lists,
    tradeoff_study,
)

logger = logging.getLogger(__name__)

def quality_study(events: Any, genre_of: dict[str, list[str]], *, seed: int = 0, seconds: float = 60.0,
                  epochs: int = 200, max_drop: float = 0.05, fresh_days: float = 60.0,
                  model_config: dict[str, Any] | None = None, grid: tuple[float, ...] = GRID) -> dict[str, Any]:
    """Train the small SASRec, build the validation curves, choose the defaults, report test once."""
    from models.factory import build_config, model_class
    from models.sequences import build_sequences, leave_one_out
    from models.trainer import TrainConfig, train_model
    from models.vocab import ItemVocabulary

    vocab = ItemVocabulary.from_ids(events["item_id"])
    split = leave_one_out(build_sequences(events, vocab))
    n_items = len(vocab)
    mcfg = build_config("sasrec", **{"n_items": n_items, "max_seq_len": 50, **(model_config or {})})
    tcfg = TrainConfig(**{**model_class("sasrec").train_defaults, "epochs": epochs, "seed": seed,
                          "max_train_seconds": seconds, "device": "cpu"})
    t0 = time.perf_counter()
    result = train_model(split, vocab, mcfg, tcfg, progress=False)
    train_s = time.perf_counter() - t0
    model = result.model.cpu().eval()
    genres = {i + 1: genre_of.get(item_id, []) for i, item_id in enumerate(vocab.ids)}
    first_seen = events.groupby("item_id")["timestamp"].min()
    added = np.full(n_items + 1, np.nan)
    added[vocab.encode(list(first_seen.index.astype(str)))] = first_seen.map(lambda t: t.timestamp()).to_numpy()
    as_of = events["timestamp"].max().timestamp()
    fresh = fresh_items(added, as_of, fresh_days)

    study = tradeoff_study(model, split.valid, split.test, n_items, genres=genres, fresh=fresh, grid=grid,
                           max_drop=max_drop)
    return {
        "model": {"config": result.model.config_dict(), "best_epoch": result.best_epoch,
                  "val_ndcg@10_trainer": result.best_val_ndcg, "train_seconds": round(train_s, 1)},
        "valid_curves": study["valid_curves"],
        "default_diversity": study["default_diversity"],
        "test_once": study["test_once"],
        "equal_ndcg_comparison": study["equal_ndcg_comparison"],
        "split": split.protocol,
        "n_items": n_items,
        "fresh_items": int(fresh.sum()),
    }


class _WithOptions:
    """The serving core with switchable request options: ``recommend(user_id, k)`` passes ``options`` on, so
    ``bench.exposure_cost.alternate`` times the same call in both configurations."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.options: dict[str, Any] = {}

    def recommend(self, user_id: str, k: int) -> dict[str, Any]:
        return self.core.recommend(user_id, k, **self.options)


OVERHEAD_CONFIGS: dict[str, dict[str, Any]] = {
    "mmr": {"diversity": 0.3, "reranker": "mmr"},
    "dpp": {"diversity": 0.3, "reranker": "dpp"},
    "explain": {"explain": True},
}


def overhead_study(ml100k: Path, *, reps: int = 10, block: int = 200, seed: int = 0) -> dict[str, Any]:
    """In-process p50 cost of diversity (MMR, DPP; N = 100, k = 10) and of ``explain`` (module docstring, 6).

    The set-up and the alternating protocol are ``bench.exposure_cost``'s (``bench_core``, ``alternate``):
    per option set, ``reps`` repetitions of one block of ``block`` recommends off, one on (order flipped
    every repetition), the exposure log off.

    Args:
        ml100k: the ml-100k folder.
        reps: alternating repetitions per option set.
        block: recommends per block (the same users, in the same order, in both configurations).
        seed: model initialisation and user sample.
    Returns:
        dict: protocol; per option set ("mmr", "dpp", "explain") off/on {p50_ms, p99_ms}, delta_p50_ms (the
        median over repetitions of the per-block p50 difference on - off, in ms) and its options;
        goal_delta_p50_ms (1.0).
    """
    from bench.exposure_cost import _pcts, alternate, bench_core

    out: dict[str, Any] = {}
    with bench_core(ml100k, block=block, k=K, seed=seed) as b:
        b.core.rerank_candidates = N_CANDIDATES
        switch = _WithOptions(b.core)
        b.core = switch
        for name, options in OVERHEAD_CONFIGS.items():
            logger.info("overhead: %s (%d repetitions of %d recommends each way)", name, reps, block)
            lat, per_rep = alternate(b, {"off": lambda: setattr(switch, "options", {}),
                                         "on": lambda o=options: setattr(switch, "options", o)}, reps=reps, k=K)
            out[name] = {"off": _pcts(lat["off"]), "on": _pcts(lat["on"]),
                         "delta_p50_ms": round(float(np.median([r["on"] - r["off"] for r in per_rep])), 4),
                         "options": options}
        switch.options = {}
        protocol = {**b.protocol, "reps": reps, "n_candidates": N_CANDIDATES, "exposure_log": "off"}
    return {"protocol": protocol, **out, "goal_delta_p50_ms": 1.0}


def log_to_mlflow(report: dict[str, Any]) -> str:
    """Log the validation curves as a table and a plot (NDCG@10 vs ILD@10) to MLflow; returns the run id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from recloop.settings import get_settings
    from registry.tracking import configure_tracking

    configure_tracking(get_settings())
    mlflow.set_experiment("recloop-rerank")
    rows = [{"reranker": m, **p} for m, c in report["quality"]["valid_curves"].items() for p in c]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ild_genre@10", "ild_emb@10"), strict=True):
        for m in RERANKERS:
            c = report["quality"]["valid_curves"][m]
            ax.plot([p["ndcg@10"] for p in c], [p[metric] for p in c], marker="o", label=m)
        ax.set_xlabel("NDCG@10 (validation)")
        ax.set_ylabel(metric)
        ax.legend()
    with mlflow.start_run(run_name="rerank-study") as run:
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "rerank_curves.json")
        mlflow.log_figure(fig, "rerank_tradeoff.png")
        mlflow.log_dict(report, "rerank_study.json")
    plt.close(fig)
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default="../shared/data/ml-100k", help="The ml-100k folder")
    parser.add_argument("--seconds", type=float, default=60.0, help="Training budget (wall-clock s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-ndcg-drop", type=float, default=0.05, help="Relative NDCG@10 loss allowed (default λ)")
    parser.add_argument("--fresh-days", type=float, default=60.0)
    parser.add_argument("--reps", type=int, default=10, help="Overhead: alternating repetitions")
    parser.add_argument("--block", type=int, default=200, help="Overhead: recommends per block")
    parser.add_argument("--no-overhead", action="store_true")
    parser.add_argument("--mlflow", action="store_true", help="Log the table and plot to MLflow")
    parser.add_argument("--json", action="store_true", help="One JSON document on stdout (the only output)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    from bench.quality import load_dataset
    from recloop.experiments import jsonable
    from recloop.settings import get_settings

    path = Path(args.path).resolve()
    events, genre_of = load_dataset("movielens-100k", path)
    policy = get_settings().event_policy
    events = policy.positives(events)
    report: dict[str, Any] = {
        "protocol": {"data": "ml-100k", "event_policy": policy.describe(), "n_candidates": N_CANDIDATES, "k": K,
                     "grid": list(GRID), "max_ndcg_drop": args.max_ndcg_drop, "fresh_days": args.fresh_days,
                     "seed": args.seed, "train_seconds_budget": args.seconds,
                     "selection": "default diversity chosen on validation; test evaluated once at it"},
        "quality": quality_study(events, genre_of, seed=args.seed, seconds=args.seconds, max_drop=args.max_ndcg_drop,
                                 fresh_days=args.fresh_days, model_config={"d_model": 64}),
    }
    if not args.no_overhead:
        report["overhead"] = overhead_study(path, reps=args.reps, block=args.block, seed=args.seed)
    if args.mlflow:
        report["mlflow_run_id"] = log_to_mlflow(report)
    text = json.dumps(jsonable(report), allow_nan=False, indent=None if args.json else 1)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
