"""What the interactive layer costs a recommend, measured in-process (no HTTP noise).

Three paired comparisons over one set-up: the serving core (``serving.recommender.RecommenderCore``)
over an ml-100k SASRec of the default size (untrained: the forward pass costs the same), the real
SQLite event log seeded with ml-100k, and an in-memory online store holding each user's last
``max_seq_len`` items; one torch thread, as the service runs.

- ``run`` (``recloop bench exposure --json``): the exposure log on vs off; goal ≤ 0.5 ms p50. Also the
  exposure log's own counts after a final flush (every recorded answer must be written).
- ``run_interleaving`` (``recloop bench interleaving --json``): the champion alone vs team-draft
  interleaving of two models (two forward passes, two masks, the merge); goal ≤ 2× the p50.
- ``run_exploration`` (``recloop bench exploration --json``): greedy vs an exploration policy
  (sampling the slate and its propensities); goal ≤ 0.3 ms p50.

Repetitions alternate a block of recommends in each configuration (same users, same order; the order
of the two flips every repetition), so drift of the shared machine hits both alike. Reported: p50/p99
per configuration and the median over repetitions of the per-block p50 difference (or ratio).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Bench:
    """The shared set-up: a core to configure, the users of one block, and what the protocol states."""

    core: Any
    users: list[str]
    vocab: Any
    settings: Any
    url: str
    protocol: dict[str, Any]


@contextmanager
def bench_core(ml100k: Path, *, block: int, k: int, seed: int) -> Iterator[Bench]:
    """Build the serving core over ml-100k (see module docstring); warm it up; yield it."""
    import torch

    from models.factory import build_config, build_model
    from models.vocab import ItemVocabulary
    from recloop.eventlog import EventLog
    from recloop.settings import get_settings
    from recloop.sources import load_source
    from serving.recommender import RecommenderCore, build_served

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    settings = get_settings()
    events = settings.event_policy.positives(load_source("movielens-100k", ml100k).events)
    vocab = ItemVocabulary.from_ids(events["item_id"].astype(str).unique())
    served = build_served(build_model(build_config("sasrec", n_items=len(vocab), max_seq_len=settings.max_seq_len)),
                          vocab, "1")
    ordered = events.sort_values(["user_id", "timestamp"], kind="stable")
    windows = {str(u): g["item_id"].astype(str).tolist()[-settings.max_seq_len:]
               for u, g in ordered.groupby("user_id", sort=False)}

    class Online:
        def recent_items(self, user_id: str) -> list[str] | None:
            return windows.get(user_id)

        def push_recent_items(self, user_id: str, items: list[str], event_ts: Any) -> None:
            windows[user_id] = list(items)

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'eventlog.db'}"
        log = EventLog(url)
        log.append(events)
        core = RecommenderCore(served, Online(), log, max_seq_len=settings.max_seq_len)
        users = [str(u) for u in np.random.default_rng(seed).choice(sorted(windows), size=block)]
        for u in users[:50]:  # warm-up
            core.recommend(u, k)
        protocol = {
            "data": "ml-100k (event log seeded with it; online store: each user's last max_seq_len items)",
            "model": "SASRec default size, untrained (the forward pass is the same cost)",
            "block": block, "k": k, "seed": seed, "torch_threads": 1,
            "alternation": "blocks of each configuration, order flipped every repetition",
            "event_policy": settings.event_policy.describe(),
        }
        try:
            yield Bench(core, users, vocab, settings, url, protocol)
        finally:
            log.close()


def alternate(bench: Bench, configure: dict[str, Callable[[], None]], *, reps: int, k: int
              ) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Time ``reps`` repetitions of one block per configuration (flipped order every repetition).

    Args:
        configure: two named callables, each setting the core up for its configuration.
    Returns:
        (latencies ms per configuration, per-repetition p50 per configuration).
    """
    names = list(configure)
    lat: dict[str, list[float]] = {n: [] for n in names}
    per_rep: list[dict[str, float]] = []
    for rep in range(reps):
        p50 = {}
        for name in (names if rep % 2 == 0 else names[::-1]):
            configure[name]()
            times = []
            for u in bench.users:
                t0 = time.perf_counter()
                bench.core.recommend(u, k)
                times.append((time.perf_counter() - t0) * 1000)
            lat[name].extend(times)
            p50[name] = float(np.percentile(times, 50))
        per_rep.append(p50)
    return lat, per_rep


def _pcts(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4)}


def run(ml100k: Path, *, reps: int = 10, block: int = 200, k: int = 10, seed: int = 0) -> dict[str, Any]:
    """The exposure log on vs off.

    Returns:
        dict: protocol, on/off {p50_ms, p99_ms}, delta_p50_ms (median of per-rep p50 differences),
        exposures {recorded, written, dropped}, goal_delta_p50_ms.
    """
    from recloop.exposures import ExposureLog

    with bench_core(ml100k, block=block, k=k, seed=seed) as b:
        exposures = ExposureLog(b.url, flush_interval_s=b.settings.exposure_flush_ms / 1000.0,
                                max_queue=b.settings.exposure_queue_max)
        lat, per_rep = alternate(b, {"on": lambda: setattr(b.core, "exposures", exposures),
                                     "off": lambda: setattr(b.core, "exposures", None)}, reps=reps, k=k)
        exposures.flush(timeout_s=30)
        stats, written = exposures.stats(), exposures.count()
        exposures.close()
        protocol = {**b.protocol, "reps": reps, "exposure_flush_ms": b.settings.exposure_flush_ms}
    return {
        "protocol": protocol,
        "on": _pcts(lat["on"]),
        "off": _pcts(lat["off"]),
        "delta_p50_ms": round(float(np.median([r["on"] - r["off"] for r in per_rep])), 4),
        "exposures": {"recorded": reps * block, "written": written, "dropped": stats.get("dropped", 0)},
        "goal_delta_p50_ms": 0.5,
    }


def run_interleaving(ml100k: Path, *, reps: int = 10, block: int = 200, k: int = 10, seed: int = 0
                     ) -> dict[str, Any]:
    """The champion alone vs team-draft interleaving of two models of the same size (exposure log off).

    Returns:
        dict: protocol, single/interleaved {p50_ms, p99_ms}, ratio_p50 (median over repetitions of the
        per-block p50 ratio), goal_ratio_p50 (2.0).
    """
    from models.factory import build_config, build_model
    from serving.recommender import ExperimentArms, build_served

    with bench_core(ml100k, block=block, k=k, seed=seed) as b:
        cfg = build_config("sasrec", n_items=len(b.vocab), max_seq_len=b.settings.max_seq_len)
        arms = ExperimentArms("bench", "interleave", (50.0, 50.0), "salt", b.core.served,
                              build_served(build_model(cfg), b.vocab, "2"))
        lat, per_rep = alternate(b, {"single": lambda: setattr(b.core, "experiment_arms", None),
                                     "interleaved": lambda: setattr(b.core, "experiment_arms", arms)},
                                 reps=reps, k=k)
        protocol = {**b.protocol, "reps": reps, "models": "two SASRec of the default size, same vocabulary",
                    "exposure_log": "off"}
    return {
        "protocol": protocol,
        "single": _pcts(lat["single"]),
        "interleaved": _pcts(lat["interleaved"]),
        "ratio_p50": round(float(np.median([r["interleaved"] / r["single"] for r in per_rep])), 3),
        "goal_ratio_p50": 2.0,
    }


def run_exploration(ml100k: Path, *, policy: str = "epsilon:0.1", reps: int = 10, block: int = 200, k: int = 10,
                    seed: int = 0, exposure_log: bool = True) -> dict[str, Any]:
    """Greedy ranking vs an exploration policy (``models.exploration``).

    With ``exposure_log`` (the default) both configurations record every answer in a SQLite exposure log, as
    the service does: Plackett-Luce's Monte Carlo marginals are then computed by its writer thread
    (``DeferredPropensities``), off the request path but on the same two cores, and every recorded answer
    must be written with its propensities.

    Returns:
        dict: protocol, greedy/explore {p50_ms, p99_ms}, delta_p50_ms (median of per-repetition p50
        differences), goal_delta_p50_ms (0.3), and with the log: exposures {recorded, written, dropped,
        explored_with_propensity}.
    """
    from models.exploration import ExplorationPolicy
    from recloop.exposures import ExposureLog

    explore_policy = ExplorationPolicy.parse(policy)
    out: dict[str, Any] = {}
    with bench_core(ml100k, block=block, k=k, seed=seed) as b:
        xlog = ExposureLog(b.url, flush_interval_s=b.settings.exposure_flush_ms / 1000.0,
                           max_queue=b.settings.exposure_queue_max) if exposure_log else None
        b.core.exposures = xlog
        lat, per_rep = alternate(b, {"greedy": lambda: setattr(b.core, "exploration", None),
                                     "explore": lambda: setattr(b.core, "exploration", explore_policy)},
                                 reps=reps, k=k)
        if xlog is not None:
            xlog.flush(timeout_s=120)
            shown, slots = xlog.read()
            explored = set(shown.loc[shown["policy"] != "greedy", "request_id"])
            props = slots[slots["request_id"].isin(explored)]["propensity"]
            out["exposures"] = {"recorded": 2 * reps * block, "written": int(len(shown)),
                                "dropped": xlog.stats().get("dropped", 0),
                                "explored_with_propensity": int(props.notna().sum() // k) if len(props) else 0}
            xlog.close()
        protocol = {**b.protocol, "reps": reps, "policy": explore_policy.describe(),
                    "exposure_log": "on (SQLite, both configurations)" if exposure_log else "off"}
    return {
        "protocol": protocol,
        "greedy": _pcts(lat["greedy"]),
        "explore": _pcts(lat["explore"]),
        "delta_p50_ms": round(float(np.median([r["explore"] - r["greedy"] for r in per_rep])), 4),
        "goal_delta_p50_ms": 0.3,
        **out,
    }


