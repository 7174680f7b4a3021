"""The BentoML ``Recommender`` service: a thin HTTP adapter over ``serving.recommender``.

Run: ``bentoml serve serving.service:Recommender`` (ready in 40-60 s; ``POST /ready`` or
``GET /readyz``). Endpoints (all ``POST``, JSON; see ``serving/schemas.py`` for bodies and errors):
``/recommend``, ``/feedback``, ``/similar_items``, ``/blocklist``, ``/forget``, ``/health``, ``/ready``,
``/model_info``.

The model lives in this process (no adaptive batching, no cross-service calls: docs/stack-notes.md).
The champion is resolved from the MLflow alias at start; a daemon thread polls the alias every
``settings.serve_poll_interval_s`` and swaps in a new version after loading and smoke-scoring it.
A failed load keeps the old model and is reported by ``/ready`` and ``/model_info``. At start, an alias
whose version does not load falls back to the last good version (``serving/runtime.py``): ``/readyz``
stays 200 while any model serves, and ``/ready`` says ``status: degraded`` with the reason.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import warnings
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument

from serving.schemas import (
    EXAMPLE_FEEDBACK,
    EXAMPLE_REQUEST,
    BlocklistRequest,
    BlocklistResponse,
    FeedbackRequest,
    FeedbackResponse,
    ForgetRequest,
    ForgetResponse,
    ItemRequest,
    ItemResponse,
    ModelInfo,
    ReadyResponse,
    RecommendRequest,
    RecommendResponse,
    SimilarRequest,
    SimilarResponse,
)

with bentoml.importing():
    from recloop.pseudonym import identity_or
    from serving.runtime import ChampionWatcher, build_runtime

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/health", "/metrics", "/docs.json", "/"})
API_PATHS = frozenset({"/recommend", "/feedback", "/similar_items", "/blocklist", "/forget", "/health", "/ready",
                       "/model_info", "/items"})
KNOWN_PATHS = OPEN_PATHS | API_PATHS


def feedback_timestamp_violation(ts: datetime, settings: Any, now: datetime | None = None) -> str:
    """The contract's timestamp bound for a client-sent event time ('' = valid; naive = UTC).

    Between ``settings.timestamp_floor`` and ``now + settings.future_skew_s`` (``recloop.contract``).
    """
    from recloop.contract import timestamp_bound_violation

    ts = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    floor = datetime.fromisoformat(settings.timestamp_floor)  # aware: the setting's validator ensures it
    return timestamp_bound_violation(
        ts, now=now or datetime.now(UTC), floor=floor, future_skew_s=settings.future_skew_s
    )


class UnknownItem(InvalidArgument):
    """``item_id`` is not in the served model's vocabulary (HTTP 400)."""


class InvalidFeedback(InvalidArgument):
    """The event log refused the event (contract violation, or an event_id reused with other content)."""


class KTooLarge(InvalidArgument):
    """``k`` exceeds ``settings.max_k`` (HTTP 400)."""


class InvalidRecommend(InvalidArgument):
    """A recommend option the served catalogue cannot apply, e.g. an unknown genre (HTTP 400)."""


class InvalidItem(InvalidArgument):
    """A new catalogue item the store refused, e.g. a bad id or a control character in its title (HTTP 400)."""


class InvalidBlocklist(InvalidArgument):
    """A blocklist change the store refused, e.g. a bad item id (HTTP 400)."""


class UserGone(BentoMLException):
    """The user was forgotten (``POST /forget``): its feedback is refused (HTTP 410 Gone)."""

    error_code = HTTPStatus.GONE


class InvalidForget(InvalidArgument):
    """A forget request the store refused, e.g. a bad user id (HTTP 400)."""


class RequestGuard:
    """ASGI middleware in front of every API route (``OPEN_PATHS`` pass through untouched).

    In order: a Host-header check against ``settings.serve_allowed_hosts`` (400; a DNS-rebinding
    guard for a service on loopback), the optional ``X-API-Key`` check (401), the content-type rule
    (``application/json`` with or without a charset; a missing one is treated as JSON; anything else
    415 — this also stops cross-site form posts), and the request body: buffered up to
    ``max_body_bytes`` (413) within ``settings.serve_body_timeout_s`` (408, so slow senders cannot
    hold the concurrency slots), then replayed to the app.
    """

    def __init__(self, app: Any, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._config: tuple[str | None, frozenset[str] | None, float] | None = None

    def _settings(self) -> tuple[str | None, frozenset[str] | None, float]:
        """(api key, allowed hosts or None for any, body timeout in s), read once."""
        if self._config is None:
            from recloop.settings import get_settings

            s = get_settings()
            hosts = [h.strip().lower() for h in s.serve_allowed_hosts.split(",") if h.strip()]
            allowed = None if "*" in hosts else frozenset(hosts + [s.serve_host.lower()])
            self._config = (s.api_key, allowed, s.serve_body_timeout_s)
        return self._config

    @staticmethod
    def _host(headers: dict[bytes, bytes]) -> str:
        raw = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if raw.startswith("["):  # [::1]:3000
            return raw[: raw.find("]") + 1] if "]" in raw else raw
        return raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw

    @staticmethod
    async def _reject(send: Any, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        key, allowed_hosts, body_timeout_s = self._settings()
        if allowed_hosts is not None and self._host(headers) not in allowed_hosts:
            await self._reject(send, 400, "Host header not allowed (settings.serve_allowed_hosts)")
            return
        if key and not hmac.compare_digest(headers.get(b"x-api-key", b""), key.encode()):
            await self._reject(send, 401, "missing or wrong X-API-Key header")
            return
        media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if media and media != b"application/json":
            shown = media.decode("latin-1")[:64]
            await self._reject(send, 415, f"content-type {shown!r} not supported; send application/json")
            return
        if not media:  # a missing content type is JSON (documented), whatever the framework would guess
            kept = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope = dict(scope, headers=[*kept, (b"content-type", b"application/json")])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            message = f"request body of {int(declared)} bytes exceeds {self.max_body_bytes}"
            await self._reject(send, 413, message)
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), timeout=body_timeout_s)
        except TimeoutError:
            await self._reject(send, 408, f"request body not received within {body_timeout_s:g} s")
            return
        if body is None:
            await self._reject(send, 413, f"request body exceeds {self.max_body_bytes} bytes")
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body, or None when it exceeds ``max_body_bytes`` (a disconnect ends it early)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return None
        return b"".join(chunks)


class _RestorePath:
    """ASGI shim under BentoML's metrics middleware: routes on the real path again (see below)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        real = scope.get("recloop.real_path")
        await self.app(scope if real is None else {**scope, "path": real}, receive, send)


def metric_label(path: str) -> str:
    """The ``endpoint`` label of a request path: known routes as they are, the rest bounded."""
    if path in KNOWN_PATHS:
        return path
    return "/static_content" if path.startswith("/static_content/") else "/other"


def _bounded_metric_paths() -> None:
    """Label BentoML's request metrics with known routes only (``metric_label``).

    BentoML 1.4.40's HTTP metrics middlewares (``RunnerTrafficMetricsMiddleware`` for new-style
    services, ``HTTPTrafficMetricsMiddleware`` for legacy ones; both outside every user middleware)
    label each series with the raw request path, so a scan of random paths grows ``/metrics``
    without bound (6,000 series and 14.5 MB from 300 requests were measured). The label is swapped
    in before the middleware reads the path, and ``_RestorePath`` below it gives the app the real path
    back, so routing (and the 404 of an unknown path) is unchanged.
    """
    from bentoml._internal.server.http import instruments

    for name in ("RunnerTrafficMetricsMiddleware", "HTTPTrafficMetricsMiddleware"):
        cls = getattr(instruments, name, None)
        if cls is None or getattr(cls, "_recloop_bounded", False):
            continue
        cls.__call__ = _bounded_call(cls.__call__)  # type: ignore[method-assign]
        cls._recloop_bounded = True  # type: ignore[attr-defined]


def _bounded_call(original: Any) -> Any:
    async def bounded(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if not isinstance(self.app, _RestorePath):
            self.app = _RestorePath(self.app)
        path = scope.get("path", "")
        if scope.get("type", "").startswith("http") and metric_label(path) != path:
            scope = {**scope, "path": metric_label(path), "recloop.real_path": path}
        await original(self, scope, receive, send)

    return bounded


def _serve_workers() -> int:
    """``Settings.effective_serve_workers`` (``RECLOOP_SERVE_WORKERS``, else the cores on the production stores,
    1 on the embedded SQLite default), read once when BentoML imports the service."""
    from recloop.settings import Settings

    return Settings().effective_serve_workers


@bentoml.service(
    name="recloop-recommender",
    workers=_serve_workers(),
    traffic={"timeout": 10, "max_concurrency": 256},
    logging={"access": {"enabled": False}},
)
class Recommender:
    """recommend / feedback / similar_items over the MLflow champion, with read-your-writes feedback."""

    def __init__(self) -> None:
        # BentoML 1.4.40 reads ``model_fields`` on instances: one warning per request otherwise.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="_bentoml_impl")
        self.runtime = build_runtime()
        self.settings = self.runtime.settings
        self.core = self.runtime.core
        # Pseudonymous ids (recloop/pseudonym.py): the API maps a client's user id before anything stores it.
        self.pseudonym = identity_or(self.settings)
        self.watcher = ChampionWatcher(self.runtime)
        self.watcher.poll_experiment()  # a replica started mid-experiment routes like the others at once
        self._poller = threading.Thread(target=self.watcher.run_forever, name="champion-poll", daemon=True)
        self._poller.start()

    @bentoml.on_shutdown
    def _flush_exposures(self) -> None:
        """Graceful stop: write the exposures still queued (a kill -9 loses at most the last flush interval)."""
        exposures = getattr(self.core, "exposures", None)
        if exposures is not None:
            exposures.close()

    def __is_ready__(self) -> bool:
        # /readyz: 200 while a model serves, so a shared store outage or a bad promotion never drops
        # every replica at once; /ready reports status ok|degraded with the reason.
        return self.watcher.model_loaded

    @bentoml.api(input_spec=RecommendRequest, output_spec=RecommendResponse)
    def recommend(self, **request: Any) -> RecommendResponse:
        """Top-k items for a user (cold-start path for unknown users). Example: ``EXAMPLE_REQUEST``."""
        req = RecommendRequest.model_construct(**request)
        if req.k > self.settings.max_k:
            raise KTooLarge(f"k={req.k} exceeds max_k={self.settings.max_k}")
        from serving.recommender import UnknownGenreError

        query = getattr(req, "query", None)
        if query is not None and len(query) > self.settings.query_max_chars:
            limit = self.settings.query_max_chars
            raise InvalidRecommend(f"query has {len(query)} characters; expected at most {limit}")
        try:
            out = self.core.recommend(
                self.pseudonym(req.user_id), req.k, req.exclude_seen, req.history, diversity=req.diversity,
                reranker=req.reranker, explain=req.explain, exclude_items=req.exclude_items, genres=req.genres,
                query=query,
            )
        except UnknownGenreError as err:
            raise InvalidRecommend(str(err)) from err
        return RecommendResponse.model_validate(out)

    @bentoml.api(input_spec=ItemRequest, output_spec=ItemResponse)
    def items(self, **request: Any) -> ItemResponse:
        """Add (or update) a new catalogue item ``{item_id, title, genres?, text?}``: stored in the shared
        ``catalog_items`` table, served at once by a text-aware model (every worker within
        ``settings.catalog_ttl_s``); an ID-only model says it waits for the next retrain. Needs the ``X-API-Key``
        when one is set (``RequestGuard``)."""
        from serving.catalog import add_item

        req = ItemRequest.model_construct(**request)
        try:
            out = add_item(self.core, {"item_id": req.item_id, "title": req.title, "genres": req.genres or [],
                                       "text": req.text})
        except ValueError as err:
            raise InvalidItem(f"item refused: {err}") from err
        return ItemResponse.model_validate(out)

    @bentoml.api(input_spec=BlocklistRequest, output_spec=BlocklistResponse)
    def blocklist(self, **request: Any) -> BlocklistResponse:
        """Add, remove or list catalogue-wide blocked (or retired) items; every worker masks them within
        ``settings.blocklist_ttl_s``. Needs the ``X-API-Key`` when one is set (``RequestGuard``)."""
        req = BlocklistRequest.model_construct(**request)
        cache = self.core.blocklist
        store = getattr(cache, "store", None)
        if store is None:
            raise InvalidBlocklist("this service has no blocklist store")
        try:
            if req.action == "add":
                changed = store.add(req.item_ids, kind=req.kind, reason=req.reason)
            elif req.action == "remove":
                changed = store.remove(req.item_ids)
            else:
                changed = []
        except ValueError as err:
            raise InvalidBlocklist(f"blocklist refused: {err}") from err
        if changed and hasattr(cache, "invalidate"):
            cache.invalidate()  # this worker at once; the others within the TTL
        return BlocklistResponse(changed=changed, items=store.list())

    @bentoml.api(input_spec=ForgetRequest, output_spec=ForgetResponse)
    def forget(self, **request: Any) -> ForgetResponse:
        """Forget a user: tombstone at once (every worker then treats it as unknown, feedback gets 410), then
        delete it from every store (``serving/forget.py``); the model forgets at the next retrain. Needs the
        ``X-API-Key`` when one is set. ``status: pending`` when the loop held its lock longer than
        ``settings.forget_lock_timeout_s``: this worker then finishes the deletion in the background."""
        req = ForgetRequest.model_construct(**request)
        from serving.forget import forget_user

        try:
            out = forget_user(self.pseudonym(req.user_id), self.settings, core=self.core, client=self.runtime.client,
                              lock_timeout_s=self.settings.forget_lock_timeout_s, background=True)
        except ValueError as err:
            raise InvalidForget(f"forget refused: {err}") from err
        return ForgetResponse.model_validate(out)

    @bentoml.api(input_spec=FeedbackRequest, output_spec=FeedbackResponse)
    def feedback(self, **request: Any) -> FeedbackResponse:
        """Store one event, refresh the user's online history from the log; ack after both."""
        req = FeedbackRequest.model_construct(**request)
        from recloop.contract import rating_violation

        rule = rating_violation(req.event_type, req.value, self.settings.rating_min, self.settings.rating_max)
        if rule:
            raise InvalidFeedback(f"value: {rule}")
        if req.timestamp is not None:
            rule = feedback_timestamp_violation(req.timestamp, self.settings)
            if rule:
                raise InvalidFeedback(f"timestamp: {rule}")
        from recloop.forget import UserForgotten

        try:
            out = self.core.feedback(
                self.pseudonym(req.user_id), req.item_id, req.event_type, req.value, req.timestamp, req.event_id,
                request_id=req.request_id, position=req.position,
            )
        except UserForgotten as err:  # the tombstone: nothing was stored
            raise UserGone(f"feedback refused: {err}") from err
        except ValueError as err:  # ContractError is a ValueError; nothing was stored
            raise InvalidFeedback(f"feedback refused: {err}") from err
        return FeedbackResponse.model_validate(out)

    @bentoml.api(input_spec=SimilarRequest, output_spec=SimilarResponse)
    def similar_items(self, **request: Any) -> SimilarResponse:
        """Nearest items by cosine similarity of the champion's item embeddings."""
        from serving.recommender import UnknownItemError

        req = SimilarRequest.model_construct(**request)
        if req.k > self.settings.max_k:
            raise KTooLarge(f"k={req.k} exceeds max_k={self.settings.max_k}")
        try:
            out = self.core.similar_items(req.item_id, req.k)
        except UnknownItemError as err:
            raise UnknownItem(f"item_id: {err.args[0]}") from err
        return SimilarResponse.model_validate(out)

    @bentoml.api
    def health(self) -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "time": datetime.now(UTC).isoformat()}

    @bentoml.api
    def ready(self) -> ReadyResponse:
        """Readiness: model loaded and both stores reachable; ``status`` ok|degraded with the ``reason``."""
        ok_log, ok_online = self.core.ping_stores()
        loaded = self.watcher.model_loaded
        online = self.core.online_status()  # a few reads; none while the store's circuit is open
        status, reason = self.watcher.status(ok_log, ok_online, online)
        return ReadyResponse(
            ready=loaded and ok_log and ok_online,
            model_loaded=loaded,
            event_log=ok_log,
            online_store=ok_online,
            status=status,
            reason=reason,
            online_store_empty=bool(online["empty"]),
            pending_pushes=int(online["pending_pushes"]),
            detail=self.watcher.info(),
        )

    @bentoml.api
    def model_info(self) -> ModelInfo:
        """The served version, its provenance and the last poll/load error."""
        return self.watcher.info()


Recommender.add_asgi_middleware(RequestGuard, max_body_bytes=MAX_BODY_BYTES)
_bounded_metric_paths()

__all__ = ["EXAMPLE_FEEDBACK", "EXAMPLE_REQUEST", "Recommender", "RequestGuard"]
