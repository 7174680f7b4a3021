"""``python -m bench.ope_study [--quick] --json``: do the off-policy estimates cover what a model then earns online?

In-process, no HTTP: simulated users (``models.simulator``) drive the real serving core
(``serving.recommender.RecommenderCore`` over an in-memory online store, a SQLite ``EventLog`` and a SQLite
``ExposureLog`` in a temporary folder, the way ``bench/simulation_study.py`` builds it). The HTTP service is
not exercised here (``recloop simulate`` drives it, without exploration or an off-policy comparison).

Two studies, one JSON document on stdout (progress on stderr):

- **Coverage** (``coverage_run`` per seed, ``ope_study`` over seeds). *Logging*: the champion (SASRec trained on
  the lake for a few seeded epochs, ``bench.simulation_study.train_champion``) serves ``epsilon:0.1``
  (``ExplorationPolicy.parse``) to the seed's users, one session each; every answer is recorded in the
  ``ExposureLog`` (policy, context, per-slot propensities, pool size) and every click and skip goes through
  ``core.feedback(..., request_id=, position=)``, so ``EventLog.linked()`` holds them. *Estimate*: other models
  (``TARGETS``: a peer, the champion's recipe with another seed, and a weak one, one epoch) are evaluated on
  that log with ``flows.ope.logged_requests`` and ``flows.ope.estimate_online_ctr`` (SNIPS and DR of the top
  slot, seeded percentile-bootstrap 95% intervals). *Truth*: each target model is then served greedily by a
  fresh core to a fresh simulator with the same seed and the same users (same starting histories, same taste noise, same
  click draws per (user, session, step)), so the only difference is the policy, and its top-slot CTR is
  measured online. *Control*: the champion's own greedy policy is estimated on the same log and served the
  same way; it differs from the logger only in the explored slots (whose coins do not depend on the context),
  so its estimates should cover whenever the logging, the linking and the estimators are right.
- **The price of exploring** (``price_of_exploring``): one round of the champion at ε in {0, 0.05, 0.1} (ε = 0
  served as ``greedy``, which shows the same slate) to the same users with the same seed: CTR (clicks / slots
  shown), top-slot CTR, catalogue share shown, and the in-process ``core.recommend`` latency.

**What is compared** (the estimators' own definition, ``flows/ope.py``). The top-slot estimators estimate,
over the logged requests that have a context, the mean probability of a click on position 1 when the
target's greedy top item (its top k on the logged context, what serving masked) is shown there. The clean
comparison is the **first slate** of each session: its context is the user's starting history under either
policy. So the estimate is computed on the first slates' requests only (``first_slates``) and the online
value is the target's clicks on position 1 of its first slates / first slates, over the same users
(``realized``); the simulator's own click probability of that item (position 1 is always examined) averaged
over those users is the noise-free ``expected`` value. The estimator masks what serving masked (the exposure's
``masked``, revision 0005: the user's whole consumption, not only the model's window);
``first_slates_whole_history`` restricts the comparison to the users whose whole lake history is in the
context (where the window alone was the mask before the exposure recorded it), a check that both agree.
``all_slates`` repeats the comparison on every logged slate against every online slate: later slates follow
each policy's own clicks (the history grows with them, skipped items are suppressed), so the logged contexts
are not the target's and the comparison is shifted by construction.

Replayability: the core's request ids (which seed the ε-greedy coins) are drawn from a seeded generator in
this process (``seeded_request_ids``), and feedback carries ``event_id = sim-<request_id>-<position>``, so a
run replays exactly. The 20 seeds vary the users drawn (when fewer than all), their taste noise, the clicks
and the exploration coins; the models are trained once, for a fixed number of epochs (a wall-clock budget
would make them depend on the machine's load).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple
from unittest import mock

import numpy as np
import torch
from scipy import stats

import serving.recommender as recommender_module
from bench.simulation_study import (
    DEFAULT_PATH,
    Lake,
    Trained,
    load_lake,
    make_core,
    round_metrics,
    train_champion,
)
from flows.ope import OPE_K, LoggedData, estimate_online_ctr, logged_requests, target_scores
from models.exploration import ExplorationPolicy
from models.ranking import top_k
from models.simulator import GroundTruth, SessionResult, SimConfig, UserSimulator, stable_hash
from recloop.experiments import jsonable
from recloop.exposures import ExposureLog
from serving.recommender import RecommenderCore, ServedModel, build_served, policy_text

logger = logging.getLogger(__name__)

LOGGING_POLICY = "epsilon:0.1"
PRICE_EPSILONS = (0.0, 0.05, 0.1)


class TargetSpec(NamedTuple):
    """An evaluated model: SASRec trained with ``seed`` for ``epochs`` epochs (``train_champion``)."""

    name: str
    seed: int
    epochs: int


#: The evaluated models: a peer of the champion (its recipe, another seed) and a weak one (one epoch).
TARGETS = (TargetSpec("peer", 1, 5), TargetSpec("weak", 2, 1))
TOP_SLOT_ESTIMATORS = ("snips", "dr")
COMPARISONS = ("first_slates", "first_slates_whole_history", "all_slates")
COVERAGE_GOAL = 0.9
N_BOOT = 1000
CONFIDENCE = 0.95

DEFINITIONS = {
    "estimate": "flows.ope.estimate_online_ctr on flows.ope.logged_requests(ExposureLog.read(), EventLog.linked()): "
                "snips = sum(w r) / sum(w), dr = mean(r_hat_pi + w (r - r_hat)), r = click on position 1, "
                "w = pi_1(logged item) / mu_1(logged item), pi = the target's greedy top item on the logged context "
                "(what serving masked: the exposure's masked ids); 95% percentile bootstrap over requests "
                "(n_boot resamples, seeded; DR refits its reward model per resample)",
    "first_slates": "the estimate on the first slate of each logged session only; online: the target's clicks on "
                    "position 1 of its first slates / its first slates, over the same users",
    "first_slates_whole_history": "first_slates restricted to the users whose whole lake consumption is in the "
                                  "logged context (history <= the model's window): there the context alone "
                                  "is serving's mask of consumed items (a check of the recorded mask)",
    "all_slates": "the estimate on every logged slate; online: the target's clicks on position 1 / slates shown, "
                  "over all its slates (later slates' contexts differ between the policies: shifted by design)",
    "realized": "the online value counted from the simulated clicks",
    "expected": "the online value without click noise: the mean of the simulator's P(click | examined) of the "
                "target's position-1 item (position 1 is always examined), at the moment it was shown",
    "covered": "ci_low <= online value <= ci_high (the estimator's 95% bootstrap interval)",
    "bias": "mean over seeds of the estimate - mean over seeds of the online value",
    "width": "mean over seeds of ci_high - ci_low",
    "diff_t_interval": "95% Student-t interval over seeds of (estimate - online value)",
    "target_agreement": "share of requests whose logged position-1 item is the target's top item (w > 0)",
    "explored_hits": "epsilon-greedy logging only: requests where the target's top item was logged at position 1 "
                     "by an explored slot (propensity eps / pool below the top k: a weight of about pool / eps)",
    "definition_agreement": "share of first slates where the target's top item as the estimator derives it "
                            "(masking the exposure's recorded mask) is the item the served target showed at "
                            "position 1",
    "ctr": "clicks / slots shown",
    "top_slot_ctr": "clicks on position 1 / slates shown",
    "catalogue_share": "distinct items shown in the round / catalogue size (the model's vocabulary)",
    "recommend_ms": "in-process wall time of core.recommend (exposure recording included: a queue append), "
                    "every request of the round",
}


# ---- serving and simulation --------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded_request_ids(seed: int) -> Iterator[None]:
    """Within the block, ``RecommenderCore.recommend``'s request ids (uuid4 hex) come from
    ``random.Random(seed)``, so the ε-greedy coins (seeded by the request id) replay. Only the name ``uuid``
    of ``serving.recommender`` is replaced; nothing else in the process is touched."""
    rng = random.Random(seed)
    fake = SimpleNamespace(uuid4=lambda: uuid.UUID(int=rng.getrandbits(128), version=4))
    with mock.patch.object(recommender_module, "uuid", fake):
        yield


@dataclass
class Round:
    """One simulated round: the sessions, the latency of every recommend and, per request id, the
    simulator's P(click | examined) of the position-1 item when it was shown."""

    results: list[SessionResult]
    recommend_ms: list[float] = field(default_factory=list)
    p_top: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def simulate_round(core: RecommenderCore, sim: UserSimulator, users: Sequence[str], *, session: int = 0,
                   id_seed: int = 0) -> Round:
    """One session per user through ``core`` (recommend, then feedback for each click and skip with the
    request id, the position and ``event_id = sim-<request_id>-<position>``)."""
    out = Round([])

    def recommend(user_id: str, k: int) -> tuple[list[str], str]:
        t0 = time.perf_counter()
        answer = core.recommend(user_id, k)
        out.recommend_ms.append((time.perf_counter() - t0) * 1000.0)
        items = [x["item_id"] for x in answer["items"]]
        if items:
            out.p_top[answer["request_id"]] = float(sim.click_probabilities(user_id, items[:1])[0])
        return items, answer["request_id"]

    def feedback(user_id: str, reaction: Any, request_id: str) -> None:
        core.feedback(user_id, reaction.item_id, reaction.action, event_id=f"sim-{request_id}-{reaction.position}",
                      request_id=request_id, position=reaction.position)

    t0 = time.perf_counter()
    with seeded_request_ids(id_seed):
        out.results = [sim.run_session(u, recommend, feedback, session) for u in users]
    out.seconds = time.perf_counter() - t0
    return out


def study_users(lake: Lake, seed: int, n: int | None) -> list[str]:
    """The seed's users: ordered by ``stable_hash(f"{seed}\\x1fope\\x1f{user}")``, the first ``n`` (all when None)."""
    order = sorted(lake.users, key=lambda u: (stable_hash(f"{seed}\x1fope\x1f{u}"), u))
    return order if n is None else order[:n]


def _serve(trained: Trained, lake: Lake, version: str) -> ServedModel:
    return build_served(trained.model, trained.vocab, version, popularity=lake.item_users)


def _top_slot(results: Sequence[SessionResult], first_only: bool) -> tuple[int, int]:
    """(clicks on position 1, slates) over the sessions' slates (the first of each session when ``first_only``)."""
    clicks = slates = 0
    for r in results:
        for reactions in r.reactions[:1] if first_only else r.reactions:
            if reactions:
                slates += 1
                clicks += reactions[0].action == "click"
    return clicks, slates


def _estimator_top1(model: Any, vocab: Any, requests: Sequence[Any]) -> list[str | None]:
    """The target's top item per logged request as ``flows.ope.estimate_online_ctr`` derives it."""
    out: list[str | None] = []
    ids = np.asarray(vocab.ids, dtype=object)
    for start in range(0, len(requests), 512):
        chunk = requests[start : start + 512]
        _, masked = target_scores(model, vocab, chunk)
        top = top_k(masked, 1)[:, 0]
        ok = np.isfinite(masked[np.arange(len(chunk)), top])
        out.extend(str(ids[j - 1]) if good and j > 0 else None for j, good in zip(top.tolist(), ok.tolist(),
                                                                                 strict=True))
    return out


def _estimates(est: dict[str, Any]) -> dict[str, Any]:
    return {name: {k: est["estimators"][name][k] for k in ("value", "ci_low", "ci_high", "ess", "n",
                                                            "n_unsupported", "unsupported_share")}
            for name in TOP_SLOT_ESTIMATORS if name in est["estimators"]}


def _covered(e: dict[str, Any], online: float | None) -> bool | None:
    low, high = e["ci_low"], e["ci_high"]
    if online is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return bool(low - 1e-12 <= online <= high + 1e-12)


# ---- the coverage study ------------------------------------------------------------------------------------------


def coverage_run(lake: Lake, truth: GroundTruth, champion: Trained, targets: dict[str, Trained], config: SimConfig,
                 users: Sequence[str], workdir: Path, *, logging_policy: str = LOGGING_POLICY, k: int = OPE_K,
                 n_boot: int = N_BOOT) -> dict[str, Any]:
    """One seed (``config.seed``): log under the exploring champion, then for each target model estimate it on
    that log and serve it greedily to a fresh simulator (module docstring)."""
    seed = config.seed
    t0 = time.perf_counter()
    explore = ExplorationPolicy.parse(logging_policy)
    # -- logging: the exploring champion, exposures and linked feedback in SQLite
    xlog = ExposureLog(f"sqlite:///{workdir / f'logging-{seed}.db'}")
    core, log = make_core(_serve(champion, lake, "champion"), lake, workdir, f"logging-{seed}", exposures=xlog)
    core.exploration = explore
    sim = UserSimulator(truth, {u: lake.histories[u] for u in users}, config)
    logged_round = simulate_round(core, sim, users, id_seed=stable_hash(f"{seed}\x1flogging"))
    if not xlog.flush(30.0):
        raise RuntimeError(f"exposure log not flushed: {xlog.stats()}")
    exposures, items = xlog.read()
    linked = log.linked()
    stats_x = xlog.stats()
    xlog.close()
    log.close()
    first_ids = {r.request_ids[0] for r in logged_round.results if r.request_ids}
    first_exp = exposures[exposures["request_id"].isin(first_ids)]
    # first slates whose context holds the user's whole consumption (lake history <= the model's window, every
    # item known): there the context alone is serving's mask (a check of the recorded mask)
    whole = [rid for rid, user, ctx in zip(first_exp["request_id"], first_exp["user_id"], first_exp["context"],
                                           strict=True) if lake.consumed.get(str(user), frozenset()) <= set(ctx)]
    data = {"first_slates": logged_requests(first_exp, items, linked, lake.policy),
            "first_slates_whole_history": logged_requests(first_exp[first_exp["request_id"].isin(whole)], items,
                                                          linked, lake.policy),
            "all_slates": logged_requests(exposures, items, linked, lake.policy)}
    by_request_user = dict(zip(exposures["request_id"].astype(str), exposures["user_id"].astype(str), strict=True))
    # per comparison, the users whose first logged request the estimators use (a cold start has no context)
    scope = {name: {by_request_user[r.request_id] for r in data[name if name != "all_slates" else "first_slates"]
                    .requests} for name in data}
    seconds = {"logging": round(time.perf_counter() - t0, 1)}
    out: dict[str, Any] = {"seed": seed, "users": len(users), "used_users": len(scope["first_slates"]),
                           "whole_history_users": len(scope["first_slates_whole_history"]),
                           "calibration": sim.calibration, "logged": {name: d.describe() for name, d in data.items()},
                           "exposure_log": stats_x, "linked_events": len(linked), "targets": {}}
    for tname, target in targets.items():
        t1 = time.perf_counter()
        # -- truth: the target served greedily to a fresh simulator (same seed, users and starting states)
        core_t, log_t = make_core(_serve(target, lake, tname), lake, workdir, f"{tname}-{seed}")
        sim_t = UserSimulator(truth, {u: lake.histories[u] for u in users}, config)
        target_round = simulate_round(core_t, sim_t, users, id_seed=stable_hash(f"{seed}\x1f{tname}"))
        log_t.close()
        row: dict[str, Any] = {}
        for name, d in data.items():
            first_only = name != "all_slates"
            online_results = [r for r in target_round.results if r.user_id in scope[name]]
            est = estimate_online_ctr(target.model, target.vocab, d, k=k, n_boot=n_boot, seed=seed)
            clicks, slates = _top_slot(online_results, first_only)
            shown = [rid for r in online_results for rid in r.request_ids[: 1 if first_only else None]]
            p = [target_round.p_top[rid] for rid in shown if rid in target_round.p_top]
            online = {"realized": clicks / slates if slates else None, "expected": float(np.mean(p)) if p else None,
                      "clicks": clicks, "slates": slates, "users": len(online_results)}
            ests = _estimates(est)
            for e in ests.values():
                e["covered"] = {kind: _covered(e, online[kind]) for kind in ("realized", "expected")}
            lc, ls = _top_slot([r for r in logged_round.results if r.user_id in scope[name]], first_only)
            block = {"estimators": ests, "online": online, "logged_top_slot_ctr": lc / ls if ls else None,
                     "target_agreement": est["target_agreement"], "reward_model": est["reward_model"],
                     "n_unknown_context": est["n_unknown_context"]}
            if first_only and d.requests:
                block.update(_first_slate_diagnostics(target, d, target_round, by_request_user, explore))
            row[name] = block
        out["targets"][tname] = row
        seconds[tname] = round(time.perf_counter() - t1, 1)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    out["seconds"] = seconds
    return out


def _first_slate_diagnostics(target: Trained, d: LoggedData, target_round: Round, by_request_user: dict[str, str],
                             explore: ExplorationPolicy) -> dict[str, Any]:
    """Explored hits and the agreement between the estimator's target and the served target (first slates)."""
    top1 = _estimator_top1(target.model, target.vocab, d.requests)
    served_top = {r.user_id: r.shown[0][0] for r in target_round.results if r.shown and r.shown[0]}
    agree = [served_top.get(by_request_user[r.request_id]) == t for r, t in zip(d.requests, top1, strict=True)]
    hits = None
    if explore.name == "epsilon":  # only for epsilon-greedy does "explored" single out the rare, heavy weights
        hits = int(sum(t is not None and r.slate[0] == t and r.propensities[0] < 1.0 - explore.epsilon - 1e-9
                       for r, t in zip(d.requests, top1, strict=True)))
    return {"definition_agreement": float(np.mean(agree)), "explored_hits": hits}


def _diff_interval(diffs: np.ndarray) -> list[float] | None:
    if len(diffs) < 2:
        return None
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)))
    return [float(diffs.mean()) - half, float(diffs.mean()) + half]


def coverage_summary(runs: Sequence[dict[str, Any]], target: str) -> dict[str, Any]:
    """One target over seeds, per comparison (first/all slates), estimator and online kind: covered seeds,
    bias, interval width, ESS, unsupported share."""
    out: dict[str, Any] = {}
    for name in COMPARISONS:
        blocks = [(r["seed"], r["targets"][target][name]) for r in runs]
        summary: dict[str, Any] = {}
        for est in TOP_SLOT_ESTIMATORS:
            have = [(seed, b) for seed, b in blocks if est in b["estimators"]]
            rows = [b["estimators"][est] for _, b in have]
            values = np.array([x["value"] for x in rows], dtype=np.float64)
            widths = np.array([x["ci_high"] - x["ci_low"] for x in rows], dtype=np.float64)
            per: dict[str, Any] = {"seeds": len(rows),
                                   "mean_estimate": float(np.nanmean(values)) if len(values) else None,
                                   "mean_width": float(np.nanmean(widths)) if len(widths) else None,
                                   "mean_ess": float(np.mean([x["ess"] for x in rows])) if rows else None,
                                   "mean_unsupported_share": float(np.mean([x["unsupported_share"] for x in rows]))
                                   if rows else None}
            for kind in ("realized", "expected"):
                truth = np.array([b["online"][kind] if b["online"][kind] is not None else np.nan for _, b in have],
                                 dtype=np.float64)
                covered = [x["covered"][kind] for x in rows]
                ok = np.isfinite(values) & np.isfinite(truth)
                diffs = values[ok] - truth[ok]
                n_cov = sum(bool(c) for c in covered)
                per[kind] = {"covered": n_cov, "of": len(rows), "coverage": n_cov / len(rows) if rows else None,
                             "goal": COVERAGE_GOAL, "meets_goal": bool(rows) and n_cov / len(rows) >= COVERAGE_GOAL,
                             "mean_online": float(np.nanmean(truth)) if len(truth) else None,
                             "bias": float(diffs.mean()) if len(diffs) else None,
                             "diff_t_interval": _diff_interval(diffs),
                             "missed_seeds": [seed for (seed, _), c in zip(have, covered, strict=True) if not c]}
            summary[est] = per
        summary["mean_target_agreement"] = float(np.mean([b["target_agreement"] or 0.0 for _, b in blocks]))
        summary["mean_logged_top_slot_ctr"] = float(np.mean([b["logged_top_slot_ctr"] or 0.0 for _, b in blocks]))
        if name != "all_slates":
            summary["mean_definition_agreement"] = float(np.mean([b.get("definition_agreement", 0.0)
                                                                  for _, b in blocks]))
            hits = [b.get("explored_hits") for _, b in blocks]
            summary["explored_hits"] = None if None in hits else int(sum(hits))
        out[name] = summary
    return out


# ---- the price of exploring --------------------------------------------------------------------------------------


def price_of_exploring(lake: Lake, truth: GroundTruth, champion: Trained, config: SimConfig, users: Sequence[str],
                       workdir: Path, epsilons: Sequence[float] = PRICE_EPSILONS) -> dict[str, Any]:
    """One round of the champion per ε (the same users, seed and request-id stream; ε = 0 served greedy)."""
    rows: dict[str, Any] = {}
    for eps in epsilons:
        policy = ExplorationPolicy() if eps == 0 else ExplorationPolicy(name="epsilon", epsilon=float(eps))
        xlog = ExposureLog(f"sqlite:///{workdir / f'price-{eps:g}.db'}")
        core, log = make_core(_serve(champion, lake, "champion"), lake, workdir, f"price-{eps:g}", exposures=xlog)
        core.exploration = policy
        sim = UserSimulator(truth, {u: lake.histories[u] for u in users}, config)
        rnd = simulate_round(core, sim, users, id_seed=stable_hash(f"{config.seed}\x1flogging"))
        xlog.close()
        log.close()
        m = round_metrics(rnd.results, lake, len(champion.vocab))
        clicks, slates = _top_slot(rnd.results, False)
        c1, s1 = _top_slot(rnd.results, True)
        ms = np.asarray(rnd.recommend_ms)
        rows[f"{eps:g}"] = {
            "epsilon": eps, "policy": policy_text(policy),
            **{key: m[key] for key in ("sessions", "slates", "slots", "clicks", "ctr", "catalogue_share",
                                       "slates_per_session", "skip_rate", "novelty", "clicks_by_position")},
            "top_slot_ctr": clicks / slates if slates else None,
            "first_slate_top_ctr": c1 / s1 if s1 else None,
            "recommend_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                             "p99": float(np.percentile(ms, 99)), "n": len(ms)},
            "seconds": round(rnd.seconds, 1)}
        _progress(f"[price eps={eps:g}] ctr={m['ctr']:.4f} top={rows[f'{eps:g}']['top_slot_ctr']:.4f} "
                  f"share={m['catalogue_share']:.3f} p50={rows[f'{eps:g}']['recommend_ms']['p50']:.2f} ms")
    base = rows[f"{epsilons[0]:g}"]
    for row in rows.values():
        row["vs_greedy"] = {"ctr": row["ctr"] - base["ctr"], "top_slot_ctr": row["top_slot_ctr"] - base["top_slot_ctr"],
                            "catalogue_share": row["catalogue_share"] - base["catalogue_share"],
                            "recommend_p50_ms": row["recommend_ms"]["p50"] - base["recommend_ms"]["p50"]}
    return {"seed": config.seed, "users": len(users), "rounds": rows}


# ---- the study ---------------------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"[ope_study {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _train(lake: Lake, role: str, seed: int, seconds: float, epochs: int, num_threads: int | None) -> Trained:
    _progress(f"training the {role}: SASRec seed={seed} budget={seconds}s epochs<={epochs}")
    trained = train_champion(lake, seed, seconds, epochs=epochs, num_threads=num_threads)
    _progress(f"{role}: {trained.info['epochs_run']} epochs, val ndcg@10 {trained.info['val_ndcg@10']:.4f}, "
              f"{trained.info['wall_seconds']}s")
    return trained


def ope_study(lake: Lake, seeds: Sequence[int] = tuple(range(20)), *, users: int | None = 500,
              champion_seed: int = 0, champion_epochs: int = 5, targets: Sequence[TargetSpec] = TARGETS,
              max_train_seconds: float = 900.0,
              logging_policy: str = LOGGING_POLICY, price_epsilons: Sequence[float] | None = PRICE_EPSILONS,
              sim: SimConfig | None = None, truth: str | None = None, n_boot: int = N_BOOT,
              train_threads: int | None = None, serve_threads: int = 1, control: bool = True) -> dict[str, Any]:
    """Both studies (module docstring). Returns the JSON-able report.

    Args:
        users: simulated users per seed (one session each; None: every lake user).
        champion_seed / champion_epochs: the logging model (SASRec, ``train_champion``, a fixed number of epochs
            so the model does not depend on the machine's load; ``max_train_seconds`` is only a safety net).
        targets: the evaluated models (``TargetSpec``: name, seed, epochs), each SASRec the same way.
        control: also evaluate the champion's own greedy policy on its log (the control: it differs from the
            logger only in the explored slots, so its estimates should cover).
        price_epsilons: the ε of the price study (None: skipped); its round uses the first seed's users.
        sim: the simulator's parameters (``SimConfig()`` by default; ``truth`` overrides its ground truth).
        train_threads / serve_threads: torch threads while training / while serving.
    """
    t0 = time.perf_counter()
    base = sim or SimConfig()
    if truth is not None:
        base = replace(base, truth=truth)
    gt = GroundTruth.fit(lake.positives, base.truth)
    champion = _train(lake, "champion (logging model)", champion_seed, max_train_seconds, champion_epochs,
                      train_threads)
    trained = {t.name: _train(lake, f"target {t.name!r} (evaluated model)", t.seed, max_train_seconds, t.epochs,
                              train_threads) for t in targets}
    threads = torch.get_num_threads()
    torch.set_num_threads(serve_threads)
    runs: list[dict[str, Any]] = []
    price = None
    evaluated = {**trained, **({"champion": champion} if control else {})}
    try:
        for seed in seeds:
            cfg = replace(base, seed=int(seed))
            with tempfile.TemporaryDirectory(prefix="recloop-ope-") as tmp:
                run = coverage_run(lake, gt, champion, evaluated, cfg, study_users(lake, int(seed), users), Path(tmp),
                                   logging_policy=logging_policy, n_boot=n_boot)
            runs.append(run)
            for tname, row in run["targets"].items():
                f, o = row["first_slates"], row["first_slates"]["online"]
                line = ", ".join(f"{e} {x['value']:.4f} [{x['ci_low']:.4f}, {x['ci_high']:.4f}] ess {x['ess']:.0f}"
                                 for e, x in f["estimators"].items())
                _progress(f"[seed {seed}] {tname} first slates: {line}; online realized {o['realized']:.4f} "
                          f"expected {o['expected']:.4f}")
            _progress(f"[seed {seed}] {run['seconds']}")
        if price_epsilons:
            with tempfile.TemporaryDirectory(prefix="recloop-ope-price-") as tmp:
                cfg = replace(base, seed=int(seeds[0]))
                price = price_of_exploring(lake, gt, champion, cfg, study_users(lake, int(seeds[0]), users), Path(tmp),
                                           price_epsilons)
    finally:
        torch.set_num_threads(threads)
    used = [r["used_users"] for r in runs]
    protocol = {
        "data": lake.describe(), "seeds": [int(s) for s in seeds],
        "serving": "in-process RecommenderCore (no HTTP): build_served(model), online store in memory (each lake "
                   "user's last max_seq_len positives), EventLog and ExposureLog in SQLite in a temp dir, "
                   "base_history/consumed = the lake snapshot; exclude_seen masks consumed and skip-suppressed items",
        "http": "not run: the HTTP service (recloop simulate) is not driven by this study",
        "models": {"architecture": "SASRec (models.factory defaults), bench.simulation_study.train_champion",
                   "champion": {"role": "logging model", **champion.info},
                   "targets": {name: {"role": "evaluated model", **t.info} for name, t in trained.items()},
                   "control": "'champion': the champion's own greedy policy, evaluated on its epsilon-greedy log"
                   if control else None,
                   "budget": "a fixed number of epochs per model (seeded); max_train_seconds only as a safety net"},
        "logging_policy": {"text": logging_policy, **ExplorationPolicy.parse(logging_policy).describe()},
        "users": {"per_seed": users if users is not None else len(lake.users), "used_per_seed": used,
                  "sessions_per_user": 1, "selection": "lake users ordered by sha256(seed, 'ope', user_id)[:8], "
                                                       "the first N (all when N >= the lake's users)"},
        "target_truth": "per target, a fresh core serving it greedily and a fresh simulator (same config and seed, "
                        "same users): same starting histories, taste noise and click draws; the policy is the only "
                        "difference",
        "request_ids": "seeded (random.Random(sha256(seed, 'logging' | target name))): exploration coins replay",
        "feedback": "core.feedback(user, item, 'click' | 'skip', request_id, position, event_id "
                    "'sim-<request_id>-<position>') for every click and skip, never for 'ignore'",
        "estimators": {"top_slot": list(TOP_SLOT_ESTIMATORS), "k": OPE_K, "n_boot": n_boot,
                       "bootstrap_seed": "the study seed", "confidence": CONFIDENCE},
        "event_policy": lake.policy.describe(),
        "simulator": {"config": base.to_dict(), "truth": {"kind": gt.kind, "params": gt.params,
                                                          "fitted_on": "all lake positives"},
                      "calibration": {str(r["seed"]): r["calibration"] for r in runs}},
        "threads": {"train": train_threads or "all cores", "serve": serve_threads},
        "price_of_exploring": {"epsilons": list(price_epsilons or []), "seed": int(seeds[0]) if seeds else None,
                               "users": "the first seed's users, one session each, the same request-id stream",
                               "eps_0": "served greedy (ExplorationPolicy()), the same slate as epsilon:0"},
        "definitions": DEFINITIONS,
    }
    coverage = {name: coverage_summary(runs, name) for name in evaluated} if runs else None
    return {"protocol": protocol, "per_seed": runs, "coverage": coverage,
            "price_of_exploring": price, "seconds": round(time.perf_counter() - t0, 1)}


QUICK = {"seeds": (0, 1), "users": 40, "champion_epochs": 1,
         "targets": (TargetSpec("peer", 1, 1), TargetSpec("weak", 2, 1)), "n_boot": 200}


def run_ope_study(source: str = "movielens-100k", path: str | Path | None = None, *, quick: bool = False,
                  source_options: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """``ope_study`` on one source, as one JSON-able document (``kw`` override the defaults / ``QUICK``)."""
    t0 = time.perf_counter()
    if path is None and source == "movielens-100k":
        path = DEFAULT_PATH
    lake = load_lake(source, path, **(source_options or {}))
    _progress(f"lake: {lake.describe()}")
    report = ope_study(lake, **{**(QUICK if quick else {}), **kw})
    out = {"bench": "ope_study", "quick": quick, "source": source, "path": None if path is None else str(path),
           **report, "seconds": round(time.perf_counter() - t0, 1)}
    return jsonable(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ope_study", description=__doc__.splitlines()[0])
    p.add_argument("--source", default="movielens-100k")
    p.add_argument("--path", default=None, help="the data folder (default for movielens-100k: ../shared/data/ml-100k)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 40 users, 1-epoch models: a smoke test")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (compact)")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1; default 20)")
    p.add_argument("--users", type=int, help="simulated users per seed (default 500; 0: every lake user)")
    p.add_argument("--champion-epochs", type=int, help="epochs of the champion (default 5)")
    p.add_argument("--target", action="append", default=[], metavar="NAME:SEED:EPOCHS",
                   help="an evaluated model (repeatable; default peer:1:5 and weak:2:1)")
    p.add_argument("--policy", default=None, help=f"logging exploration policy (default {LOGGING_POLICY})")
    p.add_argument("--no-price", action="store_true", help="skip the price-of-exploring rounds")
    p.add_argument("--threads", type=int, default=None, help="torch threads while training (default: all cores)")
    a = p.parse_args(argv)
    kw: dict[str, Any] = {k: v for k, v in {"champion_epochs": a.champion_epochs, "logging_policy": a.policy,
                                            "train_threads": a.threads}.items() if v is not None}
    if a.target:
        kw["targets"] = tuple(TargetSpec(name, int(seed), int(epochs))
                              for name, seed, epochs in (t.split(":") for t in a.target))
    if a.seeds is not None:
        kw["seeds"] = tuple(range(a.seeds))
    if a.users is not None:
        kw["users"] = a.users or None
    if a.no_price:
        kw["price_epsilons"] = None
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the one JSON document
        report = run_ope_study(a.source, a.path, quick=a.quick, **kw)
    print(json.dumps(report, allow_nan=False, indent=None if a.json else 2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raise SystemExit(main())
