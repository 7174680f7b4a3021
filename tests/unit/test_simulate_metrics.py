"""``flows.simulate``: the round metrics counted by hand, and the HTTP driver's requests and error counting."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from flows.simulate import HttpDriver, ServiceError, round_metrics, sample_users
from models.simulator import Reaction, SessionResult


def _session(user: str, shown: list[list[str]], clicks_by_position: list[int], skips: int) -> SessionResult:
    return SessionResult(user_id=user, session=0, slates=len(shown), shown=shown, clicks=sum(clicks_by_position),
                         skips=skips, clicks_by_position=np.asarray(clicks_by_position, dtype=np.int64))


def test_round_metrics_counted_by_hand() -> None:
    results = [
        _session("a", [["i1", "i2", "i3"], ["i4", "i5", "i6"]], [1, 1, 0], skips=3),  # 6 slots, 2 clicks
        _session("b", [["i1", "i7"]], [0, 0, 0], skips=1),  # a short slate: 2 slots, no click
    ]
    # shares 8/16, 4/16, 2/16, 1/16, 1/16 -> 1, 2, 3, 4, 4 bits; i6 (0) and i7 (absent) are left out
    popularity = {"i1": 8, "i2": 4, "i3": 2, "i4": 1, "i5": 1, "i6": 0}
    m = round_metrics(results, k=3, n_catalogue=10, popularity=popularity)
    assert m["sessions"] == 2 and m["slots"] == 8 and m["clicks"] == 2 and m["skips"] == 4
    assert m["ctr_at_k"] == pytest.approx(2 / 8)
    assert m["clicks_per_session"] == pytest.approx(1.0)
    assert m["slates_per_session"] == pytest.approx(1.5)
    assert m["skip_rate"] == pytest.approx(4 / 8)
    assert m["catalogue_share"] == pytest.approx(7 / 10)  # i1..i7
    assert m["novelty_slots"] == 6  # i1 i2 i3 i4 i5 of a, i1 of b
    assert m["novelty"] == pytest.approx((1 + 2 + 3 + 4 + 4 + 1) / 6)
    assert m["ctr_by_position"] == pytest.approx([1 / 3, 1 / 3, 0.0])  # position 3 shown twice, never clicked


def test_round_metrics_of_nothing_shown() -> None:
    m = round_metrics([], k=2, n_catalogue=5, popularity={})
    assert m["sessions"] == 0 and m["slots"] == 0
    assert m["ctr_at_k"] is None and m["skip_rate"] is None and m["novelty"] is None
    assert m["catalogue_share"] == 0.0 and m["ctr_by_position"] == [None, None]


def test_sample_users_is_seeded_and_sorted() -> None:
    users = [f"u{i}" for i in range(20)]
    picked = sample_users(users, 5, seed=3)
    assert picked == sample_users(list(reversed(users)), 5, seed=3) and picked == sorted(picked)
    assert len(set(picked)) == 5 and sample_users(users, 50, seed=3) == sorted(users)


def test_http_driver_links_feedback_retries_connection_errors_and_counts_failures() -> None:
    calls: list[tuple[str, dict]] = []
    refused = {"n": 1}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append((request.url.path, body))
        if request.url.path == "/recommend":
            if refused["n"]:
                refused["n"] -= 1
                raise httpx.ConnectError("refused", request=request)
            if body["user_id"] == "broken":
                return httpx.Response(503, json={"error": "down"})
            return httpx.Response(200, json={"items": [{"item_id": "7"}, {"item_id": "9"}], "model_version": "3",
                                             "request_id": "r" * 32})
        if body["event_type"] == "skip":
            return httpx.Response(400, json={"error": "bad"})
        return httpx.Response(200, json={"event_id": body["event_id"], "inserted": True, "role": "positive"})

    with HttpDriver("http://sim.test", transport=httpx.MockTransport(handler)) as driver:
        assert driver.recommend("u1", 2) == (["7", "9"], "r" * 32)  # after one refused connection
        driver.feedback("u1", Reaction("9", 2, "click"), "r" * 32)
        driver.feedback("u1", Reaction("7", 1, "ignore"), "r" * 32)  # nothing sent
        driver.feedback("u1", Reaction("7", 1, "skip"), "r" * 32)  # a 400: counted, not raised
        with pytest.raises(ServiceError):
            driver.recommend("broken", 2)  # a 503 is never retried
        assert driver.errors == 2 and driver.recommends == 1 and driver.feedbacks == 1
        assert driver.versions == {"3": 1}
    sent = [body for path, body in calls if path == "/feedback"]
    assert sent[0] == {"user_id": "u1", "item_id": "9", "event_type": "click", "event_id": f"sim-{'r' * 32}-2",
                       "request_id": "r" * 32, "position": 2}
    assert [b["event_type"] for b in sent] == ["click", "skip"]
    assert [p for p, _ in calls].count("/recommend") == 3  # refused + answered + the 503
    assert driver.acknowledged == [{"event_id": f"sim-{'r' * 32}-2", "request_id": "r" * 32, "position": 2,
                                    "item_id": "9", "event_type": "click", "inserted": True, "role": "positive"}]


def test_ctr_over_rounds_plot_and_rounds_table(tmp_path) -> None:
    from flows.simulate import rounds_markdown
    from registry.plots import ctr_over_rounds

    rounds = [{"round": 0, "model_version": "1", "ctr_at_k": 0.02, "clicks_per_session": 0.3, "slates_per_session": 1.5,
               "skip_rate": 0.4, "catalogue_share": 0.2, "novelty": 9.1, "errors": 0, "sessions_per_s": 14.0,
               "wall_s": 7.0, "loop": {"status": "done", "candidate_version": "2", "promoted": True, "wall_s": 160.0}},
              {"round": 1, "model_version": "2", "ctr_at_k": None, "clicks_per_session": None,
               "slates_per_session": None, "skip_rate": None, "catalogue_share": 0.0, "novelty": None, "errors": 1,
               "sessions_per_s": None, "wall_s": 0.1}]
    png = ctr_over_rounds(rounds, tmp_path / "ctr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = {"protocol": {"users": 5, "sessions_per_round": 2, "rounds": 2, "source": "synthetic", "truth": "ease",
                           "seed": 0}, "rounds": rounds}
    table = rounds_markdown(result).splitlines()
    assert table[-2].startswith("| 0 | 1 | 0.0200 |") and "done: v2 promoted, 160.0 s" in table[-2]
    assert table[-1].startswith("| 1 | 2 | - |") and table[-1].endswith("| - |")
    with pytest.raises(ValueError, match="empty"):
        ctr_over_rounds([], tmp_path / "none.png")
