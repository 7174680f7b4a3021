"""Team-draft interleaving: one answer merged from two rankers, every slot tagged with its ranker.

Radlinski, Kurup & Joachims, "How does clickthrough data reflect retrieval quality?", CIKM 2008,
Algorithm "Team-Draft Interleaving": like two captains picking players, the team with fewer picks so
far picks next (a fair coin decides when both have picked equally often), and a team picks its
highest-ranked item not already in the merged list. Clicks are then credited to the team of the
clicked slot (``recloop/experiment_analysis.py``). Invariants (tests/unit/test_interleaving.py):
each slot has exactly one team, each team's items keep their own list's order, the two teams'
sizes differ by at most one while both lists have items left, and every coin is fair.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

TEAM_A = "champion"
TEAM_B = "challenger"


def request_rng(request_id: str) -> random.Random:
    """A coin stream seeded by the request id (sha256), so an interleaved answer can be replayed."""
    return random.Random(int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big"))


def team_draft(
    a: Sequence[str],
    b: Sequence[str],
    k: int,
    rng: random.Random,
    teams: tuple[str, str] = (TEAM_A, TEAM_B),
) -> tuple[list[str], list[str]]:
    """Merge rankings ``a`` and ``b`` (best first, each without duplicates) into at most ``k`` items.

    Args:
        a, b: item ids, best first.
        k: answer length (>= 0).
        rng: the coin (``random.Random``); one ``random()`` draw per round in which both teams have
            picked equally often and both can still pick.
        teams: the labels of ``a``'s and ``b``'s slots.
    Returns:
        (items, slot_teams): the merged list (distinct ids, length ``min(k, |a ∪ b|)``) and the team of
        each slot.
    Raises:
        ValueError: ``k < 0``.
    """
    if k < 0:
        raise ValueError(f"k={k}; expected k >= 0")
    items: list[str] = []
    slot_teams: list[str] = []
    shown: set[str] = set()
    ia = ib = 0
    n_a = n_b = 0
    while len(items) < k:
        while ia < len(a) and a[ia] in shown:
            ia += 1
        while ib < len(b) and b[ib] in shown:
            ib += 1
        a_left, b_left = ia < len(a), ib < len(b)
        if not a_left and not b_left:
            break
        if a_left and b_left:
            pick_a = n_a < n_b or (n_a == n_b and rng.random() < 0.5)
        else:
            pick_a = a_left
        if pick_a:
            item, team, ia, n_a = a[ia], teams[0], ia + 1, n_a + 1
        else:
            item, team, ib, n_b = b[ib], teams[1], ib + 1, n_b + 1
        items.append(item)
        slot_teams.append(team)
        shown.add(item)
    return items, slot_teams
