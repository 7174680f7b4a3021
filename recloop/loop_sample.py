"""Which users an incremental loop turn retrains and evaluates on (pure, seeded).

A warm-started retrain needs the users the new events touched (their sequences changed) plus a replay sample
of the others, so the model does not drift towards the recent users only (experience replay, as in continual
learning for recommenders: e.g. Mi et al., "ADER: Adaptively Distilled Exemplar Replay Towards Continual
Learning for Session-based Recommendation", RecSys 2020; deviation: a uniform sample, not exemplars chosen by
the model). Sizes are settings: ``loop_replay_users`` (default 2,000) and ``loop_eval_users`` (2,000), so a
turn's training set is at most (new events' users + 2,000) users and its evaluation 2,000 users, whatever the
lake holds.

The draws are seeded by ``(seed, turn)``: a turn is reproducible, and successive turns replay different users.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np


def turn_rng(seed: int, turn: str) -> np.random.Generator:
    """A generator seeded by the global ``seed`` and a stable 32-bit hash (crc32) of the turn's label."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(turn.encode())])


def replay_sample(user_ids: Iterable[str], touched: Iterable[str], n: int, seed: int, turn: str) -> list[str]:
    """``n`` users drawn uniformly without replacement from ``user_ids`` minus ``touched`` (all when fewer).

    Args:
        user_ids: every user of the lake (any order; duplicates ignored).
        touched: the users the turn's new events touched (always trained on, never drawn).
        n: the replay size (``settings.loop_replay_users``), >= 0.
        seed / turn: the draw's seed (``settings.seed``) and the turn's label (e.g. the lake batch id).
    Returns:
        The drawn user ids, sorted.
    Raises:
        ValueError: ``n`` < 0.
    """
    if n < 0:
        raise ValueError(f"n={n}; expected >= 0")
    rest = np.array(sorted({str(u) for u in user_ids} - {str(u) for u in touched}), dtype=object)
    if len(rest) <= n:
        return rest.tolist()
    picked = turn_rng(seed, turn).choice(len(rest), size=n, replace=False)
    return sorted(rest[picked].tolist())


def eval_sample(user_ids: Iterable[str], n: int, seed: int, turn: str) -> np.ndarray:
    """A fixed-size evaluation sample: ``n`` of ``user_ids`` (all when fewer), seeded as ``replay_sample``.

    Returns:
        Positions into ``user_ids`` (as given), sorted ascending.
    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"n={n}; expected >= 1")
    ids = list(user_ids)
    if len(ids) <= n:
        return np.arange(len(ids))
    return np.sort(turn_rng(seed, f"eval:{turn}").choice(len(ids), size=n, replace=False))
