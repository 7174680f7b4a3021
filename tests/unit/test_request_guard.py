"""What the API accepts: host, content type, slow bodies, bounded metric labels, ids and timestamps.

In-process (the ASGI guard on a stub app, the pydantic schemas, the bound functions): the same
answer whichever event-log backend is behind the service.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pydantic
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from recloop.settings import get_settings
from serving.schemas import FeedbackRequest, RecommendRequest
from serving.service import RequestGuard, feedback_timestamp_violation, metric_label


async def _echo(request):
    return JSONResponse({"content_type": request.headers.get("content-type"), "n": len(await request.body())})


@pytest.fixture()
def client(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RECLOOP_API_KEY", raising=False)
    monkeypatch.setenv("RECLOOP_SERVE_BODY_TIMEOUT_S", "0.3")
    get_settings.cache_clear()
    app = Starlette(routes=[Route("/feedback", _echo, methods=["POST"])])
    yield TestClient(RequestGuard(app, max_body_bytes=1000), base_url="http://127.0.0.1:3000")
    get_settings.cache_clear()


def test_json_with_or_without_charset_or_missing_is_accepted(client: TestClient) -> None:
    for ct in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert client.post("/feedback", content=b"{}", headers={"content-type": ct}).status_code == 200
    bare = client.post("/feedback", content=b"{}", headers={"content-type": ""})
    assert bare.status_code == 200 and bare.json()["content_type"] == "application/json"


@pytest.mark.parametrize("ct", ["multipart/form-data; boundary=x", "text/plain", "application/x-www-form-urlencoded"])
def test_any_other_content_type_is_415(client: TestClient, ct: str) -> None:
    resp = client.post("/feedback", content=b"a=1", headers={"content-type": ct})
    assert resp.status_code == 415 and "application/json" in resp.json()["error"]


def test_foreign_host_header_is_refused(client: TestClient) -> None:
    assert client.post("/feedback", json={}, headers={"host": "evil.example:3000"}).status_code == 400
    assert client.post("/feedback", json={}, headers={"host": "localhost:3000"}).status_code == 200
    assert client.post("/feedback", json={}, headers={"host": "[::1]:3000"}).status_code == 200


def test_a_slow_sender_gets_408_instead_of_holding_a_slot(client: TestClient) -> None:
    guard = client.app
    sent: list[dict] = []

    async def trickle() -> dict:
        await asyncio.sleep(5)  # never finishes the body within the 0.3 s budget
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/feedback", "method": "POST",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]}
    started = asyncio.run(asyncio.wait_for(guard(scope, trickle, send), timeout=3)) or sent
    assert started and sent[0]["status"] == 408


def test_metric_labels_are_bounded_to_known_routes() -> None:
    assert metric_label("/recommend") == "/recommend" and metric_label("/metrics") == "/metrics"
    labels = {metric_label(f"/scan/{i}") for i in range(1000)}
    assert labels == {"/other"}


BAD_IDS = ["u\x00", "u\u202e1", "\u200b", "a\tb", "   ", "-5", "x" * 256]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_breaking_the_contract_are_refused_naming_the_field(bad: str) -> None:
    for field in ("user_id", "item_id"):
        body = {"user_id": "u1", "item_id": "i1", "event_type": "click", field: bad}
        with pytest.raises(pydantic.ValidationError) as err:
            FeedbackRequest(**body)
        assert err.value.errors()[0]["loc"] == (field,)
    with pytest.raises(pydantic.ValidationError):
        RecommendRequest(user_id="u1", history=["i1", bad])


def test_ids_are_normalised_nfc_and_stripped() -> None:
    req = FeedbackRequest(user_id=" cafe\u0301 ", item_id="i1", event_type="click")
    assert req.user_id == "caf\u00e9"


@pytest.mark.parametrize(
    ("ts", "ok"),
    [
        (datetime(1989, 12, 31, tzinfo=UTC), False),
        (datetime(1, 1, 1, tzinfo=UTC), False),
        (datetime(9999, 12, 31, tzinfo=UTC), False),
        (datetime.now(UTC) + timedelta(hours=1), False),
        (datetime.now(UTC) + timedelta(seconds=60), True),
        (datetime(2000, 1, 1), True),  # naive: taken as UTC
    ],
)
def test_feedback_timestamp_bound(ts: datetime, ok: bool) -> None:
    settings = get_settings()
    rule = feedback_timestamp_violation(ts, settings)
    assert (rule == "") is ok, rule


def test_the_blocklist_endpoint_needs_the_api_key_when_one_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.service import API_PATHS, OPEN_PATHS

    monkeypatch.setenv("RECLOOP_API_KEY", "s3cret")
    get_settings.cache_clear()
    try:
        app = Starlette(routes=[Route("/blocklist", _echo, methods=["POST"])])
        http = TestClient(RequestGuard(app), base_url="http://127.0.0.1:3000")
        assert "/blocklist" in API_PATHS and "/blocklist" not in OPEN_PATHS
        assert http.post("/blocklist", json={"action": "list"}).status_code == 401
        assert http.post("/blocklist", json={"action": "list"}, headers={"x-api-key": "wrong"}).status_code == 401
        assert http.post("/blocklist", json={"action": "list"}, headers={"x-api-key": "s3cret"}).status_code == 200
    finally:
        get_settings.cache_clear()


def test_recommend_options_are_bounded() -> None:
    from serving.schemas import MAX_EXCLUDE

    ok = RecommendRequest(user_id="1", diversity=0.5, reranker="dpp", explain=True, exclude_items=["50"],
                          genres=["Comedy"])
    assert ok.diversity == 0.5 and ok.reranker == "dpp"
    for bad in ({"diversity": 1.5}, {"diversity": -0.1}, {"reranker": "random"}, {"explain": "yes"},
                {"exclude_items": ["x"] * (MAX_EXCLUDE + 1)}, {"genres": [""]}):
        with pytest.raises(pydantic.ValidationError, match=next(iter(bad))):
            RecommendRequest(user_id="1", **bad)
