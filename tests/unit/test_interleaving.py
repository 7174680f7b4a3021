"""Team-draft interleaving (Radlinski, Kurup & Joachims, CIKM 2008): hand-computed merges and invariants."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy.stats import binomtest

from recloop.interleaving import request_rng, team_draft


class Coins(random.Random):
    """A coin that returns scripted draws (< 0.5: team A picks)."""

    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self.draws = list(draws)
        self.used = 0

    def random(self) -> float:
        self.used += 1
        return self.draws.pop(0)


def test_hand_computed_merge() -> None:
    a, b = ["1", "2", "3", "4"], ["2", "5", "1", "6"]
    # round 1: 0 picks each, coin 0.2 -> A picks "1"; round 2: A has more -> B picks "2";
    # round 3: equal, coin 0.7 -> B picks "5"; round 4: B has more -> A picks its next unseen "3";
    # round 5: equal, coin 0.1 -> A picks "4"; round 6: B picks its next unseen "6"
    coins = Coins([0.2, 0.7, 0.1])
    items, teams = team_draft(a, b, 6, coins, teams=("A", "B"))
    assert items == ["1", "2", "5", "3", "4", "6"]
    assert teams == ["A", "B", "B", "A", "A", "B"]
    assert coins.used == 3  # a coin only when both teams have picked equally often


def test_one_list_exhausted_the_other_fills() -> None:
    items, teams = team_draft(["x"], ["y", "z", "w"], 4, Coins([0.9]), teams=("A", "B"))
    assert items == ["y", "x", "z", "w"] and teams == ["B", "A", "B", "B"]
    assert team_draft([], [], 5, random.Random(0)) == ([], [])
    assert team_draft(["a"], ["b"], 0, random.Random(0)) == ([], [])
    with pytest.raises(ValueError):
        team_draft(["a"], ["b"], -1, random.Random(0))


@pytest.mark.parametrize("seed", range(200))
def test_invariants_on_random_rankings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = [str(i) for i in range(30)]
    a = list(rng.choice(pool, size=rng.integers(0, 15), replace=False))
    b = list(rng.choice(pool, size=rng.integers(0, 15), replace=False))
    k = int(rng.integers(0, 20))
    items, teams = team_draft(a, b, k, random.Random(seed), teams=("A", "B"))
    assert len(items) == len(set(items)) == len(teams) == min(k, len(set(a) | set(b)))
    assert set(teams) <= {"A", "B"}  # each slot has exactly one team
    for team, ranking in (("A", a), ("B", b)):
        mine = [i for i, t in zip(items, teams, strict=True) if t == team]
        assert mine == sorted(mine, key=ranking.index)  # a team's items keep its own order
        assert set(mine) <= set(ranking)
    for n in range(1, len(items) + 1):  # while both lists can still pick, the teams stay within one
        head = teams[:n]
        a_left = any(x not in items[:n] for x in a)
        b_left = any(x not in items[:n] for x in b)
        if a_left and b_left:
            assert abs(head.count("A") - head.count("B")) <= 1


def test_the_coin_is_fair() -> None:
    """Over 4,000 requests with identical rankings, team A wins the first slot about half the time."""
    firsts = [team_draft(["1", "2"], ["3", "4"], 2, request_rng(f"req-{i}"))[1][0] for i in range(4000)]
    n_a = sum(t == "champion" for t in firsts)
    assert binomtest(n_a, len(firsts), 0.5).pvalue > 0.001
    # and the same request id replays the same merge
    assert team_draft(["1", "2"], ["3", "4"], 2, request_rng("r")) == team_draft(["1", "2"], ["3", "4"], 2,
                                                                                  request_rng("r"))
