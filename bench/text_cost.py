"""``recloop bench text-cost``: what text-aware items and text queries cost (in-process, one thread).

1. Embedding a 10,000-item catalogue with the packaged all-MiniLM-L6-v2 (ml-latest-small's 9,742 movies plus
   258 variants of their titles, "title. genres"): seconds with an empty embedding cache, then the cached re-run.
2. ``RecommenderCore.recommend`` p50/p99 of a text-aware ("id+text") SASRec+ against the same-size ID-only one
   on ml-100k's catalogue (1,682 items, d_model 64, 50-item history, seen items masked), timed in pairs of calls
   (one each, order flipped every pair) so the shared machine's drift hits both alike; the overhead is the median
   over 10 blocks of the median pair difference (goal: <= 0.2 ms).
3. ``recommend`` with a query: uncached (every query new: one encoder forward pass; each paired with a plain
   call) and cached (a repeated query: its similarity vector is kept, paired with plain calls the same way; goal
   <= 0.5 ms over the plain call), plus the encoder alone per query.

Prints one JSON document with ``--json``; progress on stderr. Seeds: torch 0, data order fixed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

logger = logging.getLogger(__name__)


def _pcts(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(a)}


def catalogue_10k(ml_latest_small: Path) -> pd.DataFrame:
    """ml-latest-small's movies plus title variants up to 10,000 items (contract items frame)."""
    from recloop.sources import load_source

    items = load_source("movielens-latest", ml_latest_small).items
    extra = items.head(10_000 - len(items)).assign(
        item_id=lambda d: "v" + d["item_id"].astype(str), title=lambda d: d["title"] + " (director's cut)", text="")
    return pd.concat([items, extra], ignore_index=True)


def embed_cost(items: pd.DataFrame) -> dict[str, Any]:
    """Seconds to embed ``items`` with an empty cache, then with the cache filled."""
    from featurestore.materialize import load_text_encoder
    from featurestore.text import item_text_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "embedding_cache.parquet"
        t0 = time.perf_counter()
        item_text_embeddings(items, load_text_encoder(cache_path=cache))
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        item_text_embeddings(items, load_text_encoder(cache_path=cache))
        warm_s = time.perf_counter() - t0
    return {"n_items": len(items), "uncached_s": cold_s, "cached_rerun_s": warm_s,
            "items_per_s_uncached": len(items) / cold_s}


def _served(item_repr: str, n_items: int, d_text: int = 384) -> Any:
    from models.sasrec import SASRec, SASRecConfig
    from models.vocab import ItemVocabulary
    from serving.recommender import build_served

    torch.manual_seed(0)
    cfg = SASRecConfig(n_items=n_items, max_seq_len=50, item_repr=item_repr, d_text=0 if item_repr == "id" else d_text)
    model = SASRec(cfg).eval()
    if model.uses_text:
        text = torch.nn.functional.normalize(torch.randn(n_items + 1, d_text), dim=1)
        model.set_item_text(text)
    return build_served(model, ItemVocabulary([str(i) for i in range(1, n_items + 1)]), "1")


def recommend_cost(n_items: int = 1682, blocks: int = 10, per_block: int = 200, queries: int = 100) -> dict[str, Any]:
    """In-process recommend p50/p99: ID-only vs text-aware (alternating blocks), and with queries."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fakes import MemoryLog, MemoryOnline

    from featurestore.materialize import load_text_encoder
    from featurestore.text import QueryEncoder
    from recloop.catalog import CachedCatalog
    from serving.catalog import TextCatalog
    from serving.recommender import RecommenderCore

    class NoItems:
        def list(self) -> list[dict]:
            return []

    torch.set_num_threads(1)
    history = [str(i) for i in range(1, 51)]
    cores = {}
    for name, repr_ in (("id", "id"), ("id+text", "id+text")):
        core = RecommenderCore(_served(repr_, n_items), MemoryOnline({"u": history}), MemoryLog(), max_seq_len=50)
        encoder = load_text_encoder()
        core.text = TextCatalog(CachedCatalog(NoItems(), ttl_s=5.0), lambda e=encoder: e,
                                QueryEncoder(lambda e=encoder: e, 4096), None)
        cores[name] = core
        for _ in range(50):
            core.recommend("u", k=10)  # warm-up
    def call(core: Any, query: str | None = None) -> float:
        t0 = time.perf_counter()
        core.recommend("u", k=10, query=query)
        return (time.perf_counter() - t0) * 1000

    def paired(on: Any, off: Any) -> tuple[list[float], list[float], list[float]]:
        """``blocks`` x ``per_block`` pairs of calls, on/off order flipped every pair: (on ms, off ms, per-block
        medians of the pair differences)."""
        on_ms, off_ms, block_diffs = [], [], []
        for _ in range(blocks):
            diffs = []
            for i in range(per_block):
                if i % 2 == 0:
                    a = on()
                    b = off()
                else:
                    b = off()
                    a = on()
                on_ms.append(a)
                off_ms.append(b)
                diffs.append(a - b)
            block_diffs.append(float(np.median(diffs)))
        return on_ms, off_ms, block_diffs

    # 1. text-aware vs ID-only: calls alternated pair by pair, so the shared machine's drift hits both alike
    times: dict[str, list[float]] = {}
    times["id+text"], times["id"], text_diffs = paired(lambda: call(cores["id+text"]), lambda: call(cores["id"]))
    core = cores["id+text"]
    qenc = core.text.query_encoder
    qenc.encode("warm up the encoder")
    core.recommend("u", k=10, query="warm up the encoder")
    # 2. uncached queries: each paired with a plain call just before it (the difference is the query's cost)
    uncached, encoder_only, uncached_diff = [], [], []
    for i in range(queries):
        plain_ms = call(core)
        q_ms = call(core, f"space adventure with robots number {i}")
        uncached.append(q_ms)
        uncached_diff.append(q_ms - plain_ms)
        t0 = time.perf_counter()
        qenc.encoder().encode([f"a heist film in paris, take {i}"], normalize_embeddings=True)
        encoder_only.append((time.perf_counter() - t0) * 1000)
    # 3. a repeated (cached) query vs no query on the same core, alternated pair by pair
    cached, plain, cached_diffs = paired(lambda: call(core, "space adventure with robots number 1"),
                                         lambda: call(core))
    out = {"id_only": _pcts(times["id"]), "text_aware": _pcts(times["id+text"]),
           "query_uncached": _pcts(uncached), "encoder_per_query": _pcts(encoder_only),
           "query_cached": _pcts(cached), "plain_same_core": _pcts(plain)}
    out["text_aware_overhead_p50_ms"] = float(np.median(text_diffs))
    out["text_aware_overhead_block_medians_ms"] = text_diffs
    out["query_uncached_overhead_p50_ms"] = float(np.median(uncached_diff))
    out["query_cached_overhead_p50_ms"] = float(np.median(cached_diffs))
    out["query_cached_overhead_block_medians_ms"] = cached_diffs
    out["goals"] = {"text_aware_overhead_p50_ms_max": 0.2, "query_cached_overhead_p50_ms_max": 0.5,
                    "text_aware_met": out["text_aware_overhead_p50_ms"] <= 0.2,
                    "query_cached_met": out["query_cached_overhead_p50_ms"] <= 0.5}
    return out


def run_text_cost(ml_latest_small: Path, skip_embedding: bool = False) -> dict[str, Any]:
    """Both measurements and the protocol."""
    report: dict[str, Any] = {"protocol": {
        "encoder": "all-MiniLM-L6-v2 (packaged), CPU", "torch_threads_recommend": 1,
        "recommend": "RecommenderCore.recommend in-process, in-memory stores, k=10, 50-item history, seen masked; "
                     "ID-only vs id+text SASRec+ (d_model 64, 2 layers), 1,682 items; 10 blocks of 200 pairs of "
                     "calls (one each, order flipped every pair); overhead = median over blocks of the median pair "
                     "difference (the machine is shared: paired calls cancel its drift)",
        "queries": "100 distinct queries (uncached), each paired with a plain call (overhead = median of the pair "
                   "differences); then one repeated query (cached) vs no query, paired the same way",
        "catalogue_10k": "ml-latest-small's 9,742 movies plus 258 synthetic variants of their titles "
                         "(\"<title> (director's cut)\"), embedded as \"title. genres\"",
        "seed": 0}}
    if not skip_embedding:
        report["embedding"] = embed_cost(catalogue_10k(ml_latest_small))
    report["recommend"] = recommend_cost()
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.text_cost --path DIR --json`` (DIR: ml-latest-small)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="the ml-latest-small folder")
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report = run_text_cost(Path(args.path), args.skip_embedding)
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
