"""The user simulator (models/simulator.py) on ml-100k: determinism, the ordering of reference policies,
the position-based examination, growing histories, calibration and the second ground truth."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import pytest

from models.simulator import (
    GroundTruth,
    Reaction,
    SimConfig,
    UserSimulator,
    popularity_policy,
    random_policy,
    stable_hash,
    truth_policy,
    truth_recommender,
)
from recloop.sources import load_source

N_USERS = 300  # sessions per policy in the CTR test: 2 per user


@pytest.fixture(scope="module")
def ml100k(ml100k_path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """ml-100k positives ordered like the lake (received_at, row order) and each user's history."""
    events = load_source("movielens-100k", ml100k_path).events
    events = events.sort_values(["user_id", "received_at"], kind="stable")
    histories = {str(u): g["item_id"].astype(str).tolist() for u, g in events.groupby("user_id", sort=False)}
    return events, histories


@pytest.fixture(scope="module")
def ease(ml100k) -> GroundTruth:
    return GroundTruth.fit(ml100k[0], "ease")


def _users(histories: dict[str, list[str]], n: int = N_USERS) -> list[str]:
    return sorted(histories, key=stable_hash)[:n]


def _sim(gt: GroundTruth, histories: dict[str, list[str]], users: list[str], **kw) -> UserSimulator:
    return UserSimulator(gt, {u: histories[u] for u in users}, SimConfig(**kw))


def _run(sim: UserSimulator, users: list[str], recommend, sessions: int = 2) -> list:
    return [sim.run_session(u, recommend, lambda *_: None, s) for s in range(sessions) for u in users]


def _ctr(results: list) -> tuple[int, int]:
    return sum(r.clicks for r in results), sum(r.slots for r in results)


def _two_proportion_z(c1: int, n1: int, c2: int, n2: int) -> float:
    p = (c1 + c2) / (n1 + n2)
    return (c1 / n1 - c2 / n2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))


def test_same_seed_same_sessions_in_any_user_order_and_another_seed_differs(ml100k, ease):
    _, hist = ml100k
    users = _users(hist, 60)

    def sessions(order: list[str], seed: int) -> dict:
        sim = _sim(ease, hist, users, seed=seed)
        rand = random_policy(ease.item_ids, seed=7, exclude=sim.consumed)
        out = {}
        for s in range(2):
            for u in order:
                rec = truth_recommender(sim) if s == 0 else rand  # a stateless and a per-user-stateful policy
                r = sim.run_session(u, rec, lambda *_: None, s)
                out[(u, s)] = (r.shown, r.reactions, r.clicks, r.skips, r.slates, r.clicks_by_position.tolist())
        return out

    forward = sessions(users, seed=3)
    backward = sessions(users[::-1], seed=3)
    assert forward == backward
    assert sum(v[2] for v in forward.values()) > 0
    other = sessions(users, seed=4)
    assert other != forward
    assert sum(forward[key] != other[key] for key in forward) > len(forward) // 4


def test_truth_beats_popularity_beats_random_on_ctr(ml100k, ease):
    events, hist = ml100k
    users = _users(hist)
    counts = {}
    for name in ("truth", "popularity", "random"):
        sim = _sim(ease, hist, users, seed=0)
        rec = {"truth": truth_recommender(sim),
               "popularity": popularity_policy(events, exclude=sim.consumed),
               "random": random_policy(ease.item_ids, seed=0, exclude=sim.consumed)}[name]
        results = _run(sim, users, rec)
        assert len(results) >= 2 * N_USERS
        counts[name] = _ctr(results)
    ctr = {k: c / n for k, (c, n) in counts.items()}
    assert 0 <= ctr["random"] < ctr["popularity"] < ctr["truth"] <= 1
    # Margins that chance cannot flip: relative gaps and two-proportion z-statistics far beyond 4
    # (measured with click_slope 0.6: truth 0.075, popularity 0.033, random 0.005 over 9,000 to 12,500
    # slots each).
    assert ctr["truth"] > 1.5 * ctr["popularity"] and ctr["popularity"] > 4 * ctr["random"]
    assert _two_proportion_z(*counts["truth"], *counts["popularity"]) > 4
    assert _two_proportion_z(*counts["popularity"], *counts["random"]) > 4


def test_ctr_falls_with_position_under_the_position_based_model(ml100k, ease):
    _, hist = ml100k
    users = _users(hist)
    sim = _sim(ease, hist, users, seed=1)
    calls: dict[str, int] = {}

    def shuffled_truth(user_id: str, k: int) -> tuple[list[str], str]:
        # The truth's top-k in a random order: attractiveness no longer depends on the position, so the
        # clicks per position follow the examination probabilities alone.
        n = calls[user_id] = calls.get(user_id, 0) + 1
        items = truth_policy(sim, user_id, k)
        order = np.random.default_rng([99, stable_hash(user_id), n]).permutation(len(items))
        return [items[j] for j in order], f"{n:032x}"

    results = _run(sim, users, shuffled_truth, sessions=3)
    by_pos = np.sum([r.clicks_by_position for r in results], axis=0)
    assert by_pos.shape == (10,)
    assert by_pos[0] > by_pos[4] > by_pos[9]
    expected = 0.8 ** np.arange(10)
    # The shape follows decay^(p - 1): position 1 gets about 1 / 0.8^4 = 2.4x position 5.
    assert by_pos[0] / max(by_pos[4], 1) > 1.5
    assert np.corrcoef(by_pos, expected)[0, 1] > 0.9
    # The truth in its own order as well (utility and examination both fall with the position).
    fresh = _sim(ease, hist, users, seed=1)
    by_pos_ordered = np.sum([r.clicks_by_position for r in _run(fresh, users, truth_recommender(fresh))], axis=0)
    assert by_pos_ordered[0] > by_pos_ordered[4] > by_pos_ordered[9]


def test_histories_grow_with_clicks_and_consumed_items_are_never_clicked(ml100k, ease):
    _, hist = ml100k
    users = _users(hist, 100)
    sim = _sim(ease, hist, users, seed=2)
    start = {u: sim.history(u) for u in users}

    def mixed(user_id: str, k: int) -> tuple[list[str], str]:
        # Half the slate is the user's favourite consumed items (which the truth would rank high).
        seen = sim.history(user_id)[-(k // 2):]
        return (seen + truth_policy(sim, user_id, k))[:k], "0" * 32

    fed: list[tuple[str, Reaction]] = []
    for u in users:
        before = sim.history(u)
        probs = sim.click_probabilities(u, before[-5:])
        assert probs.shape == (5,) and (probs == 0).all()
        res = sim.run_session(u, mixed, lambda user, r, rid: fed.append((user, r)), 0)
        clicked = [r.item_id for slate in res.reactions for r in slate if r.action == "click"]
        assert not set(clicked) & set(before)
        assert len(set(clicked)) == len(clicked)
        assert sim.history(u) == before + clicked
        assert res.clicks == len(clicked) == int(res.clicks_by_position.sum())
        assert res.skips == sum(r.action == "skip" for slate in res.reactions for r in slate)
        assert all(len(slate) == len(shown) for slate, shown in zip(res.reactions, res.shown, strict=True))
    assert all(r.action in ("click", "skip") for _, r in fed)  # never "ignore"
    grown = sum(len(sim.history(u)) - len(start[u]) for u in users)
    assert grown == sum(r.action == "click" for _, r in fed) > 0
    # The simulator kept its own copy: the caller's histories are unchanged.
    assert all(hist[u] == start[u] for u in users)


def test_skip_is_an_explicit_dislike_never_an_item_the_user_likes(ml100k, ease):
    _, hist = ml100k
    users = _users(hist, 80)
    # examine_decay 1: every slot is examined, so every unclicked slot is a skip or an ignore by the rule alone.
    sim = _sim(ease, hist, users, seed=5, examine_decay=1.0)
    assert sim.config.skip_below == 0.0
    liked_seen = disliked_seen = 0
    for u in users:
        taste = sim.taste(u).copy()  # the utilities the slate is judged on (the history before it)
        unseen = [i for i in np.argsort(-taste) if ease.item_ids[i] not in sim.consumed(u)]
        # Half the slate from the user's best unseen items, half from the worst: both sides of skip_below.
        slate = [ease.item_ids[i] for i in unseen[:5] + unseen[-5:]] + ["not-an-item"]
        reactions = sim.respond(u, slate, session=0, step=0)
        for r in reactions:
            if r.item_id == "not-an-item":
                assert r.action == "ignore"  # unknown to the truth: no utility, never a dislike
                continue
            util = taste[ease.encode([r.item_id])[0]]
            if util >= sim.config.skip_below:
                liked_seen += 1
                assert r.action in ("click", "ignore")  # a liked item is never "not interested"
            else:
                disliked_seen += 1
                assert r.action in ("click", "skip")  # examined, disliked: skip unless it was clicked
    assert liked_seen >= 5 * len(users) - 10 and disliked_seen >= 5 * len(users) - 10
    # The click chance of a disliked item is tiny, so nearly all of them are skips.
    skips = sum(r.action == "skip" for u in users for r in sim.respond(u, [ease.item_ids[i] for i in
                np.argsort(sim.taste(u))[:10]], session=1, step=0))
    assert skips >= 0.95 * 10 * len(users)

    # skip_below=None: nothing is ever reported as a skip; a higher threshold dislikes more.
    never = _sim(ease, hist, users, seed=5, examine_decay=1.0, skip_below=None)
    strict = _sim(ease, hist, users, seed=5, examine_decay=1.0, skip_below=1.0)
    base = _sim(ease, hist, users, seed=5, examine_decay=1.0)
    rand = {name: random_policy(ease.item_ids, seed=3, exclude=s.consumed)
            for name, s in (("never", never), ("strict", strict), ("base", base))}
    skips_by = {name: sum(r.skips for r in _run(s, users, rand[name], sessions=1))
                for name, s in (("never", never), ("strict", strict), ("base", base))}
    assert skips_by["never"] == 0 < skips_by["base"] < skips_by["strict"]
    with pytest.raises(ValueError, match="skip_below"):
        SimConfig(skip_below=float("nan"))


def test_calibration_reaches_target_top_ctr(ml100k, ease):
    _, hist = ml100k
    users = _users(hist, 250)
    for target in (0.3, 0.5):
        sim = _sim(ease, hist, users, seed=0, target_top_ctr=target)
        cal = sim.calibration
        assert cal["users"] == 200
        assert abs(cal["achieved_top_ctr"] - target) < 0.01
        # Recompute independently from the public API: the top-1 unseen item's P(click | examined).
        sample = sorted(users, key=lambda u: (stable_hash(f"0\x1f{u}"), u))[:200]
        tops = [sim.click_probabilities(u, truth_policy(sim, u, 1))[0] for u in sample]
        assert abs(float(np.mean(tops)) - target) < 0.01


def test_itemknn_truth_fits_and_runs_a_session(ml100k):
    events, hist = ml100k
    truth = GroundTruth.fit(events, "itemknn", k_neighbours=50)
    assert truth.kind == "itemknn" and truth.params["k_neighbours"] == 50
    assert truth.weights.shape == (truth.n_items, truth.n_items) == (1682, 1682)
    users = _users(hist, 50)
    sim = _sim(truth, hist, users, truth="itemknn", seed=0)
    assert abs(sim.calibration["achieved_top_ctr"] - 0.3) < 0.01
    results = _run(sim, users, truth_recommender(sim), sessions=1)
    assert sum(r.clicks for r in results) > 0
    assert all(1 <= r.slates <= 5 and all(len(s) == 10 for s in r.shown) for r in results)


def test_utilities_and_config_checks(ml100k, ease):
    _, hist = ml100k
    u = next(iter(hist))
    raw = ease.utilities(hist[u])
    assert raw.shape == (ease.n_items,) and np.isfinite(raw).all()
    assert np.allclose(ease.utilities([]), np.log1p(ease.popularity))  # cold start: popularity
    assert np.allclose(ease.utilities(hist[u] + ["not-an-item"]), raw)
    with pytest.raises(ValueError, match="truth"):
        SimConfig(truth="sasrec")
    with pytest.raises(ValueError, match="examine_decay"):
        SimConfig(examine_decay=0.0)
    with pytest.raises(ValueError, match="kind"):
        GroundTruth.fit(pd.DataFrame({"user_id": ["a"], "item_id": ["b"]}), "gru4rec")
    sim = _sim(ease, hist, [u], seed=0)
    with pytest.raises(KeyError, match="not simulated"):
        sim.history("nobody")
    assert stable_hash("x") == int.from_bytes(hashlib.sha256(b"x").digest()[:8], "big")
