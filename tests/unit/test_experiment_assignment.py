"""The user → arm assignment of online experiments (``recloop.experiments.assign_arm``): stable, balanced, salted."""

from __future__ import annotations

import math

import pytest
from scipy.stats import chisquare

from recloop.experiments import ARMS, OnlineExperiment, assign_arm

N = 100_000


def _challenger_share(salt: str, weights: tuple[float, float], n: int = N) -> float:
    return sum(assign_arm(salt, f"user-{k}", weights) == "challenger" for k in range(n)) / n


def test_the_same_user_always_gets_the_same_arm() -> None:
    users = [f"u{k}" for k in range(1_000)]
    first = [assign_arm("salt-a", u, (50, 50)) for u in users]
    second = [assign_arm("salt-a", u, (50, 50)) for u in users]
    assert first == second
    assert set(first) == set(ARMS)


def test_the_hash_is_the_documented_one() -> None:
    import hashlib

    digest = hashlib.sha256(b"s\x1fu1").digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    assert assign_arm("s", "u1", (50, 50)) == ("champion" if u < 0.5 else "challenger")
    # the separator keeps ("ab", "c") and ("a", "bc") apart: different inputs to the hash
    assert hashlib.sha256(b"ab\x1fc").digest() != hashlib.sha256(b"a\x1fbc").digest()


def test_a_50_50_split_is_balanced() -> None:
    challenger = round(_challenger_share("balance", (50.0, 50.0)) * N)
    result = chisquare([N - challenger, challenger])
    assert result.pvalue > 0.001, (challenger, result)


def test_a_90_10_split_gives_the_challenger_a_tenth() -> None:
    share = _challenger_share("weighted", (90.0, 10.0))
    assert abs(share - 0.1) <= 0.005, share


def test_different_salts_give_independent_assignments() -> None:
    n = 20_000
    users = [f"user-{k}" for k in range(n)]
    a = [assign_arm("salt-1", u, (50, 50)) == "challenger" for u in users]
    b = [assign_arm("salt-2", u, (50, 50)) == "challenger" for u in users]
    # 2x2 contingency: independence means each cell holds about a quarter
    cells = [sum(x == p and y == q for x, y in zip(a, b, strict=True)) for p in (False, True) for q in (False, True)]
    assert chisquare(cells).pvalue > 0.001, cells
    agreement = sum(x == y for x, y in zip(a, b, strict=True)) / n
    assert abs(agreement - 0.5) < 4 * math.sqrt(0.25 / n), agreement


@pytest.mark.parametrize("weights", [(0, 1), (1, 0), (-1, 1), (float("nan"), 1), (1, float("inf"))])
def test_bad_weights_are_refused(weights: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        assign_arm("s", "u", weights)


def test_an_experiment_assigns_with_its_own_salt_and_weights() -> None:
    from datetime import UTC, datetime

    exp = OnlineExperiment("exp-000000000001", "ab", "3", "4", (70.0, 30.0), "pepper", "running", datetime.now(UTC))
    assert [exp.arm_of(f"u{k}") for k in range(50)] == [assign_arm("pepper", f"u{k}", (70.0, 30.0)) for k in range(50)]
    assert exp.version_of("champion") == "3" and exp.version_of("challenger") == "4"
    assert exp.as_dict()["weights"] == [70.0, 30.0] and exp.as_dict()["started_at"].endswith("+00:00")
    assert OnlineExperiment.from_dict(exp.as_dict()) == exp
