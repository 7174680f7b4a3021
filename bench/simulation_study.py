"""``python -m bench.simulation_study --json``: the in-process simulation studies (no HTTP).

Simulated users (``models.simulator``: a ground truth of another family than the served model,
position-based examination, calibrated clicks, sessions) drive the real serving core
(``serving.recommender.RecommenderCore`` over an in-memory online store and a SQLite ``EventLog`` in
a temporary folder): the simulator calls ``core.recommend(user, k)`` and
``core.feedback(user, item, "click" | "skip", request_id=..., position=...)``, so the exclusion of
seen and suppressed items, the read-your-writes history and the event policy are the service's own.

Two studies, one JSON document on stdout (progress on stderr):

- ``loop_study``: four disjoint user groups (a seeded hash of the user id), one per policy: **loop**
  (served by the current model, retrained between rounds: warm start from the served weights on
  ``flows.train.prepare_split`` of the lake plus the loop group's simulated events, swapped in when its
  validation NDCG@10 is not worse than the served model's on the same split: the gate), **frozen**
  (the first champion, never retrained), **popularity** and **random** (non-neural scorers served by
  the same core). Per round and policy: CTR@k, clicks and slates per session, skip rate, catalogue
  share shown, novelty; per seed and over seeds (mean, 95% t-interval); the loop-vs-frozen
  difference at the last round; and the same study under a second ground truth (``itemknn``).
- ``experiment_study``: a strong model against a weak one on fresh simulated users, once as an A/B
  test (``recloop.experiments.assign_arm``) and once, same users and seed, as team-draft interleaving
  (``ExperimentArms(mode="interleave")``); after every batch of sessions the decision of
  ``recloop.experiment_analysis.analyse_experiment`` (A/B: the always-valid mSPRT p-value;
  interleaving: the sign test), and how many sessions each method needed to reach alpha = 0.05.

``--quick`` runs both on few users, one seed and one or two rounds (a smoke test). The protocol of
every figure (data, seeds, groups, budgets, event policy, calibration) is in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from flows.train import prepare_split
from models.checkpoint import checkpoint_dict
from models.factory import build_config, model_class
from models.metrics import evaluate
from models.ranking import MappedScorer
from models.simulator import GroundTruth, Reaction, SessionResult, SimConfig, UserSimulator, stable_hash
from models.trainer import TrainConfig, train_model
from models.vocab import PAD_IDX, ItemVocabulary
from recloop.contract import EVENT_COLUMNS
from recloop.eventlog import EventLog
from recloop.experiment_analysis import analyse_experiment
from recloop.experiments import jsonable
from recloop.policy import EventPolicy
from recloop.settings import get_settings
from recloop.sources import load_source
from serving.recommender import ExperimentArms, RecommenderCore, ServedModel, build_served

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "data" / "ml-100k"
POLICIES = ("loop", "frozen", "popularity", "random")
METRICS = ("ctr", "clicks_per_session", "slates_per_session", "skip_rate", "catalogue_share", "novelty")
SERVED_MODEL = "sasrec"
EVAL_K = 10
ALPHA = 0.05
GATE = ("swap the retrained model in when its validation NDCG@10 >= the served model's, both scored on the "
        "validation set of the same retraining split (leave-one-out: each user's second-to-last positive, "
        "which for a loop user is a recent simulated click); otherwise keep serving the current model")

DEFINITIONS = {
    "ctr": "clicks / slots shown (CTR@k; every slot of every slate counts, examined or not)",
    "clicks_per_session": "clicks / sessions",
    "slates_per_session": "slates shown / sessions",
    "skip_rate": "skips (examined, not clicked, disliked: utility < SimConfig.skip_below) / slots shown",
    "catalogue_share": "distinct items shown in the round / catalogue size",
    "novelty": "mean over slots shown of -log2((users with a positive on the item in the lake + 1) / "
               "(lake users + 1)) (Zhou et al., PNAS 2010; models.metrics.novelty)",
    "interval": "95% Student-t interval over seeds: mean +- t_{0.975, n-1} * sd / sqrt(n) (None with one seed)",
    "loop_minus_frozen_user_ci": "within one seed: 95% normal interval of the difference of mean per-user CTR "
                                 "(Welch standard error), users of the two groups",
}


# ---- data as serving and training see it ------------------------------------------------------------------------


@dataclass
class Lake:
    """The dataset as the lake holds it, and what serving derives from it at start.

    Attributes:
        events: the contract events frame (every row, every event type).
        histories: user -> positive item ids, oldest first (received_at, then row order: ``build_sequences``).
        base_history: user -> (last ``max_seq_len`` of the history, newest received_at): serving's snapshot.
        consumed: user -> every positive item (serving's "seen" set).
        item_users: item -> users with a positive on it (popularity, novelty).
    """

    source: str
    path: str | None
    options: dict[str, Any]
    policy: EventPolicy
    max_seq_len: int
    events: pd.DataFrame
    positives: pd.DataFrame
    histories: dict[str, list[str]]
    base_history: dict[str, tuple[list[str], datetime]]
    consumed: dict[str, frozenset[str]]
    item_users: dict[str, int]

    @property
    def users(self) -> list[str]:
        return list(self.histories)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "options": self.options, "events": len(self.events),
                "positives": len(self.positives), "users": len(self.histories), "items": len(self.item_users),
                "max_seq_len": self.max_seq_len}


def load_lake(source: str, path: str | Path | None, *, policy: EventPolicy | None = None, max_seq_len: int = 50,
              **options: Any) -> Lake:
    """``recloop.sources.load_source`` and the lake snapshot serving builds from it."""
    frames = load_source(source, Path(path) if path else None, **options)
    events = frames.events.reset_index(drop=True)
    policy = policy or get_settings().event_policy
    pos = policy.positives(events)
    order = "received_at" if "received_at" in pos.columns else "timestamp"
    pos = pos.assign(_o=pos[order]).sort_values(["user_id", "_o"], kind="stable").drop(columns="_o")
    histories: dict[str, list[str]] = {}
    base: dict[str, tuple[list[str], datetime]] = {}
    for user, g in pos.groupby("user_id", sort=True):
        items = g["item_id"].astype(str).tolist()
        histories[str(user)] = items
        base[str(user)] = (items[-max_seq_len:], pd.Timestamp(g[order].max()).to_pydatetime())
    item_users = pos.drop_duplicates(["user_id", "item_id"])["item_id"].astype(str).value_counts().to_dict()
    return Lake(source, None if path is None else str(path), {k: v for k, v in options.items()}, policy,
                max_seq_len, events, pos, histories, base, {u: frozenset(h) for u, h in histories.items()},
                {str(k): int(v) for k, v in item_users.items()})


class MemoryOnline:
    """The online store in memory: each user's last pushed list (what Feast's ``user_recent_items`` holds)."""

    def __init__(self, rows: dict[str, list[str]] | None = None) -> None:
        self.rows = {u: list(v) for u, v in (rows or {}).items()}

    def recent_items(self, user_id: str) -> list[str] | None:
        return self.rows.get(user_id)

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> None:
        self.rows[user_id] = list(items)


class ScoreStub:
    """A non-neural scorer the serving core serves like a model (``score``, ``item_embeddings``, ``config``).

    ``kind="popularity"``: the lake's user count per item, the same for every history.
    ``kind="random"``: uniform scores drawn from ``default_rng([seed, stable_hash(history)])``, so a list
    is random but replayable (it changes when the history does; shown-and-skipped items are masked by
    the core's suppression).
    """

    name = "stub"

    def __init__(self, kind: str, vocab: ItemVocabulary, max_seq_len: int, *, counts: dict[str, int] | None = None,
                 seed: int = 0) -> None:
        if kind not in ("popularity", "random"):
            raise ValueError(f"kind={kind!r}; expected 'popularity' or 'random'")
        self.kind, self.seed = kind, seed
        self.config = SimpleNamespace(n_items=len(vocab), max_seq_len=max_seq_len)
        base = np.zeros(len(vocab) + 1, dtype=np.float32)
        for i, item in enumerate(vocab.ids, start=1):
            base[i] = float((counts or {}).get(item, 0))
        self.base = base

    def eval(self) -> ScoreStub:
        return self

    def item_embeddings(self) -> torch.Tensor:
        return torch.ones(self.config.n_items + 1, 1)

    def score(self, item_idx: Any, candidate_idx: Any = None) -> torch.Tensor:
        idx = np.asarray(item_idx.cpu() if isinstance(item_idx, torch.Tensor) else item_idx, dtype=np.int64)
        if self.kind == "popularity":
            out = np.tile(self.base, (idx.shape[0], 1))
        else:
            out = np.stack([np.random.default_rng([self.seed, stable_hash(row[row != PAD_IDX].tobytes().hex())])
                            .random(self.config.n_items + 1).astype(np.float32) for row in idx])
        out[:, PAD_IDX] = -np.inf
        return torch.from_numpy(out)


def make_core(served: ServedModel, lake: Lake, workdir: Path, name: str,
              exposures: Any | None = None) -> tuple[RecommenderCore, EventLog]:
    """A serving core over a fresh SQLite event log ``<workdir>/<name>.db`` and an online store seeded with
    each lake user's last ``max_seq_len`` items (the materialised ``user_recent_items``)."""
    log = EventLog(f"sqlite:///{workdir / f'{name}.db'}")
    log.policy = lake.policy
    online = MemoryOnline({u: items for u, (items, _) in lake.base_history.items()})
    core = RecommenderCore(served, online, log, max_seq_len=lake.max_seq_len, source="simulator",
                           base_history=lake.base_history, consumed=lake.consumed, policy=lake.policy,
                           exposures=exposures)
    return core, log


def core_recommend(core: RecommenderCore) -> Callable[[str, int], tuple[list[str], str]]:
    def recommend(user_id: str, k: int) -> tuple[list[str], str]:
        answer = core.recommend(user_id, k)
        return [x["item_id"] for x in answer["items"]], answer["request_id"]

    return recommend


def core_feedback(core: RecommenderCore, also: Callable[[str, Reaction, str], None] | None = None
                  ) -> Callable[[str, Reaction, str], None]:
    def feedback(user_id: str, reaction: Reaction, request_id: str) -> None:
        core.feedback(user_id, reaction.item_id, reaction.action, request_id=request_id, position=reaction.position)
        if also is not None:
            also(user_id, reaction, request_id)

    return feedback


def served_stub(kind: str, vocab: ItemVocabulary, lake: Lake, seed: int, version: str) -> ServedModel:
    stub = ScoreStub(kind, vocab, lake.max_seq_len, counts=lake.item_users, seed=seed)
    return build_served(stub, vocab, version, popularity=lake.item_users)


# ---- training -----------------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """A trained sequential model and how it was made."""

    model: Any
    vocab: ItemVocabulary
    info: dict[str, Any]


def train_champion(lake: Lake, seed: int, seconds: float, *, epochs: int = 200, num_threads: int | None = None,
                   user_share: float = 1.0) -> Trained:
    """SASRec (``models.factory``, its defaults, ``max_seq_len`` of the lake) on ``prepare_split`` of the lake,
    seeded, with a wall-clock budget (checked after each epoch). ``user_share`` < 1 trains on a seeded
    share of the users' training sequences (a deliberately weak model)."""
    t0 = time.perf_counter()
    vocab, split = prepare_split(lake.events, policy=lake.policy)
    if user_share < 1.0:
        keep = {u for u in split.train if stable_hash(f"{seed}\x1fweak\x1f{u}") / 2**64 < user_share}
        split = replace(split, train={u: s for u, s in split.train.items() if u in keep})
    cfg = build_config(SERVED_MODEL, n_items=len(vocab), max_seq_len=lake.max_seq_len)
    tc = TrainConfig(**{**model_class(SERVED_MODEL).train_defaults, "seed": seed, "epochs": epochs,
                        "max_train_seconds": seconds, "num_threads": num_threads})
    res = train_model(split, vocab, cfg, tc, progress=False)
    info = {"model": SERVED_MODEL, "seed": seed, "budget_s": seconds, "epochs_max": epochs,
            "epochs_run": len(res.history), "best_epoch": res.best_epoch, "val_ndcg@10": res.best_val_ndcg,
            "train_seconds": round(res.train_seconds, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
            "user_share": user_share, "split": split.protocol, "config": asdict(cfg),
            "train_config": {k: tc.model_dump()[k] for k in ("lr", "batch_size", "all_windows", "loss", "seed")}}
    return Trained(res.model, vocab, info)


def retrain(lake: Lake, log: EventLog, served: Trained, *, seed: int, epochs: int, seconds: float | None,
            num_threads: int | None = None) -> tuple[Trained, dict[str, Any]]:
    """Warm-start the served model on the lake plus every event of ``log`` (the loop group's), then gate.

    Returns:
        (the candidate, the report: sizes, both validation NDCG@10 and ``promoted``).
    """
    t0 = time.perf_counter()
    cols = [c for c in EVENT_COLUMNS if c in lake.events.columns]
    simulated = log.since()
    train_events = pd.concat([lake.events[cols], simulated[cols]], ignore_index=True)
    vocab, split = prepare_split(train_events, base_vocab=served.vocab, policy=lake.policy)
    cfg = build_config(SERVED_MODEL, **{**asdict(served.model.config), "n_items": len(vocab)})
    tc = TrainConfig(**{**model_class(SERVED_MODEL).train_defaults, "seed": seed, "epochs": epochs,
                        "max_train_seconds": seconds, "all_windows": False, "num_threads": num_threads})
    res = train_model(split, vocab, cfg, tc, init_state=checkpoint_dict(served.model, served.vocab), progress=False)
    scorer = served.model if vocab == served.vocab else MappedScorer(served.model, served.vocab, vocab)
    served_ndcg = float(evaluate(scorer, split.valid, n_items=len(vocab), k=EVAL_K)["metrics"][f"ndcg@{EVAL_K}"])
    report = {"simulated_events": len(simulated),
              "simulated_positives": int(lake.policy.positive_mask(simulated).sum()) if len(simulated) else 0,
              "train_events": len(train_events), "epochs_run": len(res.history),
              "candidate_val_ndcg@10": res.best_val_ndcg, "served_val_ndcg@10": served_ndcg,
              "promoted": bool(res.best_val_ndcg >= served_ndcg), "seconds": round(time.perf_counter() - t0, 1)}
    return Trained(res.model, vocab, {"seed": seed, "warm_start": True}), report


# ---- metrics ------------------------------------------------------------------------------------------------------


def round_metrics(results: Sequence[SessionResult], lake: Lake, n_items: int) -> dict[str, Any]:
    """The metrics of ``DEFINITIONS`` over the sessions of one round and policy."""
    slots = sum(r.slots for r in results)
    clicks = sum(r.clicks for r in results)
    skips = sum(r.skips for r in results)
    slates = sum(r.slates for r in results)
    shown = [i for r in results for slate in r.shown for i in slate]
    n_users = len(lake.histories)
    info = [-math.log2((lake.item_users.get(i, 0) + 1) / (n_users + 1)) for i in shown]
    by_pos = np.sum([r.clicks_by_position for r in results], axis=0) if results else []
    return {"sessions": len(results), "slates": slates, "slots": slots, "clicks": clicks, "skips": skips,
            "ctr": clicks / slots if slots else None,
            "clicks_per_session": clicks / len(results) if results else None,
            "slates_per_session": slates / len(results) if results else None,
            "skip_rate": skips / slots if slots else None,
            "catalogue_share": len(set(shown)) / n_items if n_items else None,
            "novelty": float(np.mean(info)) if info else None,
            "clicks_by_position": [int(x) for x in by_pos]}


def user_ctrs(results: Sequence[SessionResult]) -> np.ndarray:
    """Per-user CTR (clicks / slots over the user's sessions), users with a slot."""
    agg: dict[str, list[int]] = {}
    for r in results:
        a = agg.setdefault(r.user_id, [0, 0])
        a[0] += r.clicks
        a[1] += r.slots
    return np.asarray([c / s for c, s in agg.values() if s], dtype=np.float64)


def t_interval(values: Iterable[float | None], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and Student-t interval over seeds (``DEFINITIONS["interval"]``)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    out: dict[str, Any] = {"mean": float(v.mean()) if len(v) else None, "ci": None, "n": len(v),
                           "values": [float(x) for x in v]}
    if len(v) > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
        out["ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def welch_interval(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """mean(a) - mean(b) with a normal interval from Welch's standard error."""
    if len(a) < 2 or len(b) < 2:
        return {"diff": None, "ci": None}
    diff = float(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    return {"diff": diff, "ci": [diff - z * se, diff + z * se], "users": [len(a), len(b)]}


# ---- the loop study -----------------------------------------------------------------------------------------------


def user_groups(users: Sequence[str], seed: int, n_per: int, names: Sequence[str] = POLICIES) -> dict[str, list[str]]:
    """Disjoint groups: users ordered by ``stable_hash(f"{seed}\\x1fgroups\\x1f{user}")`` and dealt round-robin
    into ``len(names)`` groups; each group keeps its first ``n_per``."""
    order = sorted(users, key=lambda u: (stable_hash(f"{seed}\x1fgroups\x1f{u}"), u))
    return {name: order[g :: len(names)][:n_per] for g, name in enumerate(names)}


@dataclass
class LoopSettings:
    rounds: int = 5
    users_per_policy: int = 100
    sessions_per_round: int = 2
    champion_seconds: float = 60.0
    champion_epochs: int = 200
    retrain_epochs: int = 1
    retrain_seconds: float | None = None
    num_threads: int | None = None


def _champion(cache: dict[Any, Trained], lake: Lake, seed: int, s: LoopSettings) -> Trained:
    key = ("champion", seed, s.champion_seconds, s.champion_epochs)
    if key not in cache:
        _progress(f"training the champion seed={seed} budget={s.champion_seconds}s")
        cache[key] = train_champion(lake, seed, s.champion_seconds, epochs=s.champion_epochs,
                                    num_threads=s.num_threads)
        _progress(f"champion seed={seed} {cache[key].info['epochs_run']} epochs, "
                  f"val ndcg@10 {cache[key].info['val_ndcg@10']:.4f}")
    return cache[key]


def loop_run(lake: Lake, truth: GroundTruth, config: SimConfig, s: LoopSettings, cache: dict[Any, Trained],
             workdir: Path) -> dict[str, Any]:
    """One seed of the loop study (``config.seed``); see the module docstring."""
    seed = config.seed
    champion = _champion(cache, lake, seed, s)
    groups = user_groups(lake.users, seed, s.users_per_policy)
    study_users = [u for g in groups.values() for u in g]
    sim = UserSimulator(truth, {u: lake.histories[u] for u in study_users}, config)
    vocab = champion.vocab
    tag = f"{config.truth}-{seed}"
    cores: dict[str, tuple[RecommenderCore, EventLog]] = {
        "loop": make_core(build_served(champion.model, vocab, "1", popularity=lake.item_users), lake, workdir,
                          f"loop-{tag}"),
        "frozen": make_core(build_served(champion.model, vocab, "1", popularity=lake.item_users), lake, workdir,
                            f"frozen-{tag}"),
        "popularity": make_core(served_stub("popularity", vocab, lake, seed, "popularity"), lake, workdir,
                                f"popularity-{tag}"),
        "random": make_core(served_stub("random", vocab, lake, seed, "random"), lake, workdir, f"random-{tag}"),
    }
    served_loop, version = champion, 1
    rounds, retrains, last_results = [], [], {}
    for r in range(s.rounds):
        row: dict[str, Any] = {"round": r, "policies": {}}
        for name in POLICIES:
            core, _ = cores[name]
            rec, fb = core_recommend(core), core_feedback(core)
            t0 = time.perf_counter()
            results = [sim.run_session(u, rec, fb, r * s.sessions_per_round + j)
                       for j in range(s.sessions_per_round) for u in groups[name]]
            m = round_metrics(results, lake, len(vocab))
            m["model_version"] = core.served.version
            m["seconds"] = round(time.perf_counter() - t0, 1)
            row["policies"][name] = m
            last_results[name] = results
        rounds.append(row)
        _progress(f"[{tag}] round {r}: " + ", ".join(f"{p} ctr={row['policies'][p]['ctr']:.4f}" for p in POLICIES))
        if r < s.rounds - 1:
            candidate, report = retrain(lake, cores["loop"][1], served_loop, seed=seed * 1000 + r + 1,
                                        epochs=s.retrain_epochs, seconds=s.retrain_seconds,
                                        num_threads=s.num_threads)
            report["after_round"] = r
            if report["promoted"]:
                version += 1
                served_loop = candidate
                cores["loop"][0].swap(build_served(candidate.model, candidate.vocab, str(version),
                                                   popularity=lake.item_users))
            report["served_version"] = str(version)
            retrains.append(report)
            _progress(f"[{tag}] retrain after round {r}: candidate {report['candidate_val_ndcg@10']:.4f} vs served "
                      f"{report['served_val_ndcg@10']:.4f} -> {'promoted' if report['promoted'] else 'kept'}")
    for _, log in cores.values():
        log.close()
    last = s.rounds - 1
    diff = welch_interval(user_ctrs(last_results["loop"]), user_ctrs(last_results["frozen"]))

    def gap(r: int) -> float:
        return rounds[r]["policies"]["loop"]["ctr"] - rounds[r]["policies"]["frozen"]["ctr"]

    return {"seed": seed, "truth": config.truth, "groups": {k: len(v) for k, v in groups.items()},
            "calibration": sim.calibration, "champion": champion.info, "rounds": rounds, "retrains": retrains,
            "loop_minus_frozen_last_round": {"round": last, "ctr": gap(last), "round0_ctr": gap(0),
                                             "diff_in_diff_ctr": gap(last) - gap(0), "mean_user_ctr": diff}}


def _aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in range(len(runs[0]["rounds"])):
        row = {"round": r, "policies": {}}
        for name in POLICIES:
            row["policies"][name] = {m: t_interval(run["rounds"][r]["policies"][name][m] for run in runs)
                                     for m in METRICS}
        out.append(row)
    return out


def loop_study(lake: Lake, seeds: Sequence[int] = (0, 1, 2), *, rounds: int = 5, users_per_policy: int = 100,
               sessions_per_round: int = 2, champion_seconds: float = 60.0, champion_epochs: int = 200,
               retrain_epochs: int = 1, retrain_seconds: float | None = None, truth: str = "ease",
               second_truth: str | None = "itemknn", second_truth_seeds: Sequence[int] | None = None,
               sim: SimConfig | None = None, num_threads: int | None = None,
               cache: dict[Any, Trained] | None = None, truths: dict[str, GroundTruth] | None = None) -> dict[str, Any]:
    """The loop study (module docstring). Returns the JSON-able report."""
    t0 = time.perf_counter()
    s = LoopSettings(rounds, users_per_policy, sessions_per_round, champion_seconds, champion_epochs,
                     retrain_epochs, retrain_seconds, num_threads)
    cache = {} if cache is None else cache
    truths = {} if truths is None else truths
    base = replace(sim or SimConfig(), truth=truth)

    def fitted(kind: str) -> GroundTruth:
        if kind not in truths:
            truths[kind] = GroundTruth.fit(lake.positives, kind)
        return truths[kind]

    with tempfile.TemporaryDirectory(prefix="recloop-sim-") as tmp:
        runs = [loop_run(lake, fitted(truth), replace(base, seed=int(seed)), s, cache, Path(tmp)) for seed in seeds]
        second = None
        if second_truth:
            second_seeds = list(second_truth_seeds if second_truth_seeds is not None else seeds[:1])
            second_runs = [loop_run(lake, fitted(second_truth), replace(base, truth=second_truth, seed=int(seed)), s,
                                    cache, Path(tmp)) for seed in second_seeds]
            second = _second_truth(runs, second_runs, truth, second_truth)
    last = rounds - 1
    report = {
        "protocol": _loop_protocol(lake, seeds, s, base, runs, truths, second_truth),
        "per_seed": {str(run["seed"]): run for run in runs},
        "aggregate": {"rounds": _aggregate(runs)},
        "loop_vs_frozen": {
            "round": last, "metric": "ctr (loop - frozen)",
            "over_seeds": t_interval(run["loop_minus_frozen_last_round"]["ctr"] for run in runs),
            "diff_in_diff": {"what": "(loop - frozen CTR at the last round) - (loop - frozen CTR at round 0): both "
                                     "groups serve the same champion in round 0, so this removes the groups' "
                                     "composition difference",
                             "over_seeds": t_interval(run["loop_minus_frozen_last_round"]["diff_in_diff_ctr"]
                                                      for run in runs)},
            "per_seed_mean_user_ctr": {str(run["seed"]): run["loop_minus_frozen_last_round"]["mean_user_ctr"]
                                       for run in runs},
        },
        "second_truth": second,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return report


def _second_truth(runs: Sequence[dict[str, Any]], second_runs: Sequence[dict[str, Any]], truth: str,
                  second: str) -> dict[str, Any]:
    last = len(second_runs[0]["rounds"]) - 1
    seeds = [run["seed"] for run in second_runs]
    same = [run for run in runs if run["seed"] in seeds]

    def summary(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {name: {m: t_interval(run["rounds"][last]["policies"][name][m] for run in rs)["mean"]
                       for m in METRICS} for name in POLICIES}

    a, b = summary(same), summary(second_runs)
    order = {t: sorted(POLICIES, key=lambda p, x=x: -(x[p]["ctr"] or 0)) for t, x in ((truth, a), (second, b))}
    def per_round(rs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{name: t_interval(run["rounds"][r]["policies"][name]["ctr"] for run in rs)["mean"]
                 for name in POLICIES} for r in range(last + 1)]

    return {
        "truth": second, "seeds": seeds, "round": last,
        "last_round": b,
        "ctr_by_round": {truth: per_round(same), second: per_round(second_runs)},
        "same_seeds_with_first_truth": a,
        "ctr_ratio_second_over_first": {p: (b[p]["ctr"] / a[p]["ctr"]) if a[p]["ctr"] else None for p in POLICIES},
        "ctr_order": order,
        "loop_minus_frozen": {"ctr": t_interval(run["loop_minus_frozen_last_round"]["ctr"]
                                                for run in second_runs)["mean"],
                              "mean_user_ctr": [run["loop_minus_frozen_last_round"]["mean_user_ctr"]
                                                for run in second_runs]},
        "calibration": {str(run["seed"]): run["calibration"] for run in second_runs},
        "retrains": {str(run["seed"]): run["retrains"] for run in second_runs},
    }


def _loop_protocol(lake: Lake, seeds: Sequence[int], s: LoopSettings, sim: SimConfig, runs: Sequence[dict[str, Any]],
                   truths: dict[str, GroundTruth], second_truth: str | None) -> dict[str, Any]:
    return {
        "data": lake.describe(),
        "seeds": [int(x) for x in seeds],
        "groups": f"users ordered by sha256(seed, 'groups', user_id)[:8] and dealt round-robin into {list(POLICIES)}; "
                  f"each keeps its first {s.users_per_policy} (disjoint; the same user is never in two groups)",
        "policies": {
            "loop": "served by the current model; retrained between rounds (warm start from the served weights) "
                    "on prepare_split(lake + the loop group's simulated events) and swapped in by the gate",
            "frozen": "the first champion, never retrained",
            "popularity": "the lake's users per item (the same list for everyone), served by the same core",
            "random": "uniform scores seeded by (seed, history), served by the same core",
        },
        "serving": "RecommenderCore(build_served(model, vocab, version), online=in-memory last max_seq_len items, "
                   "events=EventLog(SQLite in a temp dir), base_history/consumed = the lake snapshot, "
                   "exposures=None); exclude_seen masks consumed items and the items a skip suppresses",
        "champion": {"model": SERVED_MODEL, "budget_s": s.champion_seconds, "epochs_max": s.champion_epochs,
                     "budget_rule": "models.trainer: the time budget is checked after each epoch",
                     "data": "prepare_split(lake events): leave-one-out on the policy's positives",
                     "seed": "the study seed", "num_threads": s.num_threads or "all cores"},
        "retrain": {"warm_start": "from the served model's checkpoint (checkpoint_dict)", "epochs": s.retrain_epochs,
                    "budget_s": s.retrain_seconds, "windows": "all_windows=False (each user's latest window)",
                    "data": "lake events + every event the loop group's core logged so far (EventLog.since)",
                    "seed": "seed * 1000 + round + 1", "gate": GATE,
                    "only_loop_events_train": True},
        "event_policy": lake.policy.describe(),
        "simulator": {"config": sim.to_dict(), "sessions_per_round": s.sessions_per_round, "rounds": s.rounds,
                      "session_numbers": "round * sessions_per_round + j (j < sessions_per_round)",
                      "calibration": {str(run["seed"]): run["calibration"] for run in runs},
                      "truths": {k: {"kind": t.kind, "params": t.params, "fitted_on": "all lake positives"}
                                 for k, t in truths.items()},
                      "second_truth": second_truth},
        "definitions": DEFINITIONS,
    }


# ---- the experiment study -------------------------------------------------------------------------------------------


class SimClock:
    """Simulated time: batch b runs in the hour [t0 + b h, t0 + (b + 1) h), 1 ms per stamp, so the A/B
    report's hourly looks (``look_every="1h"``) are the batches."""

    def __init__(self, t0: datetime = datetime(2030, 1, 1, tzinfo=UTC)) -> None:
        self.t0, self.batch, self.tick = t0, 0, 0

    def start_batch(self, batch: int) -> None:
        self.batch, self.tick = batch, 0

    def now(self) -> datetime:
        self.tick += 1
        return self.t0 + timedelta(hours=self.batch, milliseconds=self.tick)


class MemoryExposures:
    """An exposure sink (``ExposureSink.record``) that keeps the rows in memory, stamped by a ``SimClock``."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.exposures: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def record(self, request_id: str, user_id: str, model_version: str, items: list[tuple[str, float]],
               **kw: Any) -> bool:
        ts = self.clock.now()
        self.exposures.append({"request_id": request_id, "user_id": user_id, "ts": ts,
                               "model_version": model_version, "variant": kw.get("variant", ""),
                               "experiment_id": kw.get("experiment_id"), "arm": kw.get("arm"),
                               "policy": kw.get("policy", "greedy"), "context": list(kw.get("context") or [])})
        teams = kw.get("teams")
        for pos, (item, score) in enumerate(items, start=1):
            self.items.append({"request_id": request_id, "position": pos, "item_id": item, "score": score,
                               "team": teams[pos - 1] if teams else None, "propensity": None})
        return True

    def feedback(self, user_id: str, reaction: Reaction, request_id: str) -> None:
        ts = self.clock.now()
        self.events.append({"request_id": request_id, "position": reaction.position, "user_id": user_id,
                            "item_id": reaction.item_id, "event_type": reaction.action, "value": None,
                            "timestamp": ts, "received_at": ts})

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        return pd.DataFrame(self.exposures), pd.DataFrame(self.items), pd.DataFrame(self.events)


def _experiment_run(mode: str, lake: Lake, truth: GroundTruth, config: SimConfig, strong: ServedModel,
                    weak: ServedModel, users: Sequence[str], max_sessions: int, batch_sessions: int,
                    workdir: Path) -> dict[str, Any]:
    """One method on one seed: sessions in batches, the decision after each batch, stop at the first winner."""
    seed = config.seed
    sim = UserSimulator(truth, {u: lake.histories[u] for u in users}, config)
    clock = SimClock()
    sink = MemoryExposures(clock)
    core, log = make_core(strong, lake, workdir, f"exp-{mode}-{config.truth}-{seed}", exposures=sink)
    exp_id = f"sim-{mode}-{seed}"
    core.experiment_arms = ExperimentArms(exp_id, mode, (50.0, 50.0), f"sim-salt-{seed}", champion=weak,
                                          challenger=strong)
    experiment = SimpleNamespace(experiment_id=exp_id, mode=mode, weights=(50.0, 50.0),
                                 champion_version=weak.version, challenger_version=strong.version)
    order = sorted(users, key=lambda u: (stable_hash(f"{seed}\x1fexperiment\x1f{u}"), u))
    rec, fb = core_recommend(core), core_feedback(core, also=sink.feedback)
    trajectory, first = [], None
    done = 0
    t0 = time.perf_counter()
    batch = 0
    while done < max_sessions:
        clock.start_batch(batch)
        n = min(batch_sessions, max_sessions - done)
        for j in range(done, done + n):
            sim.run_session(order[j % len(order)], rec, fb, j // len(order))
        done += n
        ex, it, ev = sink.frames()
        report = analyse_experiment(experiment, ex, it, ev, lake.policy, alpha=ALPHA)
        d = report["decision"]
        users_seen = int(ex["user_id"].nunique())
        trajectory.append({"sessions": done, "users": users_seen, "p_value": d["p_value"], "winner": d["winner"],
                           "effect": d["effect"]})
        if d["winner"] is not None and first is None:
            first = {"sessions": done, "users": users_seen, "winner": d["winner"], "p_value": d["p_value"],
                     "effect": d["effect"], "picked_strong": d["winner"] == "challenger"}
            break
        batch += 1
    log.close()
    ex, it, ev = sink.frames()
    final = analyse_experiment(experiment, ex, it, ev, lake.policy, alpha=ALPHA)
    detail = ({a: {k: final["arms"][a][k] for k in ("users", "requests", "impressions", "clicks", "ctr",
                                                   "mean_user_ctr")} for a in ("champion", "challenger")}
              if mode == "ab" else {k: final[k] for k in ("requests", "wins", "losses", "ties", "no_click", "delta",
                                                         "clicks_by_team")})
    return {"mode": mode, "seed": seed, "significant": first is not None,
            "sessions_to_significance": first["sessions"] if first else None,
            "users_at_significance": first["users"] if first else None,
            "winner": first["winner"] if first else None,
            "picked_strong": bool(first and first["picked_strong"]),
            "p_value": first["p_value"] if first else trajectory[-1]["p_value"],
            "effect": first["effect"] if first else trajectory[-1]["effect"],
            "sessions_run": done, "censored_at": None if first else done,
            "last_report": detail, "srm": final.get("srm"),
            "trajectory": trajectory, "seconds": round(time.perf_counter() - t0, 1)}


def experiment_study(lake: Lake, seeds: Sequence[int] = (0, 1, 2, 3, 4), *, max_sessions: int = 3000,
                     batch_sessions: int = 25, weak: str = "popularity", truth: str = "ease",
                     strong_seed: int = 0, champion_seconds: float = 60.0, champion_epochs: int = 200,
                     weak_seconds: float = 5.0, sim: SimConfig | None = None, num_threads: int | None = None,
                     cache: dict[Any, Trained] | None = None,
                     truths: dict[str, GroundTruth] | None = None) -> dict[str, Any]:
    """The experiment study (module docstring). Returns the JSON-able report.

    Args:
        weak: ``"popularity"`` (the lake's most popular items, served through a model stub) or
            ``"undertrained"`` (SASRec trained for one epoch on a seeded 10% of the users).
        strong_seed: the seed of the strong model (the champion of the loop study with this seed, reused
            from ``cache`` when it was trained already).
    """
    t0 = time.perf_counter()
    cache = {} if cache is None else cache
    truths = {} if truths is None else truths
    if truth not in truths:
        truths[truth] = GroundTruth.fit(lake.positives, truth)
    s = LoopSettings(champion_seconds=champion_seconds, champion_epochs=champion_epochs, num_threads=num_threads)
    champ = _champion(cache, lake, strong_seed, s)
    strong = build_served(champ.model, champ.vocab, "strong", popularity=lake.item_users)
    if weak == "popularity":
        weak_served = served_stub("popularity", champ.vocab, lake, strong_seed, "weak")
        weak_info: dict[str, Any] = {"kind": "popularity", "what": "the lake's users per item, served by the same "
                                     "core through a model stub (consumed and suppressed items masked)"}
    elif weak == "undertrained":
        key = ("weak", strong_seed, weak_seconds)
        if key not in cache:
            cache[key] = train_champion(lake, strong_seed, weak_seconds, epochs=1, num_threads=num_threads,
                                        user_share=0.1)
        weak_served = build_served(cache[key].model, cache[key].vocab, "weak", popularity=lake.item_users)
        weak_info = {"kind": "undertrained", "what": "SASRec, one epoch on a seeded 10% of the users",
                     **cache[key].info}
    else:
        raise ValueError(f"weak={weak!r}; expected 'popularity' or 'undertrained'")
    base = replace(sim or SimConfig(), truth=truth)
    users = lake.users
    runs = []
    with tempfile.TemporaryDirectory(prefix="recloop-exp-") as tmp:
        for seed in seeds:
            cfg = replace(base, seed=int(seed))
            row = {"seed": int(seed)}
            for mode in ("ab", "interleave"):
                row[mode] = _experiment_run(mode, lake, truths[truth], cfg, strong, weak_served, users, max_sessions,
                                            batch_sessions, Path(tmp))
                _progress(f"[experiment seed={seed}] {mode}: significant={row[mode]['significant']} "
                          f"sessions={row[mode]['sessions_to_significance']} winner={row[mode]['winner']}")
            a, b = row["ab"]["sessions_to_significance"], row["interleave"]["sessions_to_significance"]
            row["ratio_ab_over_interleave"] = (a / b) if a and b else None
            row["ratio_lower_bound"] = (max_sessions / b) if (a is None and b) else None
            runs.append(row)
    return {"protocol": _experiment_protocol(lake, seeds, max_sessions, batch_sessions, weak_info, champ, base,
                                             truths[truth]),
            "runs": runs, "summary": _experiment_summary(runs, max_sessions),
            "seconds": round(time.perf_counter() - t0, 1)}


def _experiment_summary(runs: Sequence[dict[str, Any]], max_sessions: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("ab", "interleave"):
        rs = [r[mode] for r in runs]
        sessions = [r["sessions_to_significance"] for r in rs if r["significant"]]
        out[mode] = {"runs": len(rs), "significant": sum(r["significant"] for r in rs),
                     "picked_strong": sum(r["picked_strong"] for r in rs),
                     "picked_weak": sum(r["significant"] and not r["picked_strong"] for r in rs),
                     "sessions_to_significance": [r["sessions_to_significance"] for r in rs],
                     "median_sessions": float(np.median(sessions)) if sessions else None,
                     "censored_at": max_sessions}
    ratios = [r["ratio_ab_over_interleave"] for r in runs if r["ratio_ab_over_interleave"]]
    bounds = [r["ratio_lower_bound"] for r in runs if r["ratio_lower_bound"]]
    out["ratio_ab_over_interleave"] = {
        "per_seed": [r["ratio_ab_over_interleave"] for r in runs],
        "median": float(np.median(ratios)) if ratios else None,
        "geometric_mean": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,
        "lower_bounds_where_ab_censored": bounds,
        "literature": "10-100x fewer sessions for interleaving (Chapelle et al., TOIS 2012; Schuth et al., 2015)",
    }
    return out


def _experiment_protocol(lake: Lake, seeds: Sequence[int], max_sessions: int, batch_sessions: int,
                         weak_info: dict[str, Any], champ: Trained, sim: SimConfig, truth: GroundTruth
                         ) -> dict[str, Any]:
    return {
        "data": lake.describe(), "seeds": [int(x) for x in seeds], "alpha": ALPHA,
        "strong": {"kind": "SASRec champion", **champ.info, "arm": "challenger"},
        "weak": {**weak_info, "arm": "champion"},
        "users": "every lake user, fresh: a new simulator per run (lake history, no earlier simulated clicks)",
        "schedule": "users ordered by sha256(seed, 'experiment', user_id)[:8]; session j goes to user "
                    "order[j % n_users] with session number j // n_users (new users first, then returning ones); "
                    "the A/B run and the interleaving run use the same schedule, users and seed",
        "ab": "ExperimentArms(mode='ab', weights 50/50, salt 'sim-salt-<seed>'): recloop.experiments.assign_arm "
              "sends each user to one arm; decision: analyse_experiment (mSPRT always-valid p-value over hourly "
              "looks, one look per batch; SRM checked; >= 20 users per arm)",
        "interleave": "ExperimentArms(mode='interleave'): team-draft interleaving of both arms' lists (coin seeded "
                      "by the request id, a uuid4: this run is not bit-replayable); decision: the two-sided sign "
                      "test of wins vs losses",
        "batches": f"{batch_sessions} sessions per batch, decision after each batch, stop at the first winner or "
                   f"{max_sessions} sessions (censored)",
        "caveat": "the mSPRT p-value is valid at any stopping time; the sign test is a fixed-horizon test, so "
                  "stopping at its first p < alpha over repeated looks overstates its confidence (the sessions it "
                  "needed are a lower bound for a properly sequential interleaving test)",
        "frames": "exposures/items/events built in memory (MemoryExposures) with simulated time (SimClock)",
        "event_policy": lake.policy.describe(),
        "simulator": {"config": sim.to_dict(), "truth": {"kind": truth.kind, "params": truth.params}},
    }


# ---- entry point --------------------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"[simulation_study {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


QUICK_LOOP = {"seeds": (0,), "rounds": 2, "users_per_policy": 15, "sessions_per_round": 1, "champion_seconds": 1.0,
              "champion_epochs": 1, "retrain_epochs": 1, "second_truth_seeds": (0,)}
QUICK_EXPERIMENT = {"seeds": (0,), "max_sessions": 60, "batch_sessions": 30}


def run_studies(source: str, path: str | Path | None, *, quick: bool = False, studies: Sequence[str] = ("loop",
                "experiment"), loop: dict[str, Any] | None = None, experiment: dict[str, Any] | None = None,
                source_options: dict[str, Any] | None = None, sim_options: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Both studies on one source (one JSON-able document); ``sim_options`` override ``SimConfig`` fields."""
    t0 = time.perf_counter()
    lake = load_lake(source, path, **(source_options or {}))
    _progress(f"lake: {lake.describe()}")
    sim = SimConfig(**(sim_options or {}))
    cache: dict[Any, Trained] = {}
    truths: dict[str, GroundTruth] = {}
    out: dict[str, Any] = {"bench": "simulation_study", "quick": quick, "source": source,
                           "path": None if path is None else str(path)}
    if "loop" in studies:
        kw = {**(QUICK_LOOP if quick else {}), **(loop or {})}
        out["loop_study"] = loop_study(lake, cache=cache, truths=truths, sim=sim, truth=sim.truth, **kw)
    if "experiment" in studies:
        kw = {**(QUICK_EXPERIMENT if quick else {}), **(experiment or {})}
        if quick:
            kw.setdefault("champion_seconds", QUICK_LOOP["champion_seconds"])
            kw.setdefault("champion_epochs", QUICK_LOOP["champion_epochs"])
        elif loop:
            for key in ("champion_seconds", "champion_epochs"):
                if key in loop:
                    kw.setdefault(key, loop[key])
        out["experiment_study"] = experiment_study(lake, cache=cache, truths=truths, sim=sim, truth=sim.truth, **kw)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return jsonable(out)


def _options(values: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.simulation_study", description=__doc__.splitlines()[0])
    p.add_argument("--source", default="movielens-100k")
    p.add_argument("--path", default=None, help="the data folder (default for movielens-100k: ../shared/data/ml-100k)")
    p.add_argument("--option", action="append", default=[], help="source option key=value (repeatable)")
    p.add_argument("--sim", action="append", default=[], help="SimConfig field key=value (JSON), e.g. skip_below=null")
    p.add_argument("--study", choices=("loop", "experiment", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, few users: a smoke test")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--rounds", type=int)
    p.add_argument("--users-per-policy", type=int)
    p.add_argument("--sessions-per-round", type=int)
    p.add_argument("--champion-seconds", type=float)
    p.add_argument("--champion-epochs", type=int, help="epoch cap of the champion (with its time budget)")
    p.add_argument("--retrain-epochs", type=int)
    p.add_argument("--second-truth", default=None, help="'itemknn' (default) | 'ease' | 'none'")
    p.add_argument("--exp-seeds", type=int, nargs="+")
    p.add_argument("--max-sessions", type=int)
    p.add_argument("--batch-sessions", type=int)
    p.add_argument("--weak", choices=("popularity", "undertrained"))
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    loop = {k: v for k, v in {"seeds": a.seeds, "rounds": a.rounds, "users_per_policy": a.users_per_policy,
                              "sessions_per_round": a.sessions_per_round, "champion_seconds": a.champion_seconds,
                              "champion_epochs": a.champion_epochs, "retrain_epochs": a.retrain_epochs,
                              "second_truth": a.second_truth,
                              "num_threads": a.threads}.items() if v is not None}
    experiment = {k: v for k, v in {"seeds": a.exp_seeds, "max_sessions": a.max_sessions,
                                    "champion_seconds": a.champion_seconds, "champion_epochs": a.champion_epochs,
                                    "batch_sessions": a.batch_sessions, "weak": a.weak,
                                    "num_threads": a.threads}.items() if v is not None}
    if a.second_truth is not None and a.second_truth.lower() == "none":
        loop["second_truth"] = None
    studies = ("loop", "experiment") if a.study == "all" else (a.study,)
    path = a.path if a.path is not None else (str(DEFAULT_PATH) if a.source == "movielens-100k" else None)
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the one JSON document
        report = run_studies(a.source, path, quick=a.quick, studies=studies, loop=loop, experiment=experiment,
                             source_options=_options(a.option), sim_options=_options(a.sim))
    print(json.dumps(report, allow_nan=False, indent=None if a.json else 2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raise SystemExit(main())
