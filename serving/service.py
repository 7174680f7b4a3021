"""The BentoML ``Recommender`` service: a thin HTTP adapter over ``serving.recommender``.

Run: ``bentoml serve serving.service:Recommender`` (ready in 40-60 s; ``POST /ready`` or
``GET /readyz``). Endpoints (all ``POST``, JSON; see ``serving/schemas.py`` for bodies and errors):
``/recommend``, ``/feedback``, ``/similar_items``, ``/health``, ``/ready``, ``/model_info``.

The model lives in this process (no adaptive batching, no cross-service calls: docs/stack-notes.md).
The champion is resolved from the MLflow alias at start; a daemon thread polls the alias every
``settings.serve_poll_interval_s`` and swaps in a new version after loading and smoke-scoring it.
A failed load keeps the old model and is reported by ``/ready`` and ``/model_info``.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import warnings
from datetime import UTC, datetime
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument

from serving.schemas import (
    EXAMPLE_FEEDBACK,
    EXAMPLE_REQUEST,
    FeedbackRequest,
    FeedbackResponse,
    ModelInfo,
    ReadyResponse,
    RecommendRequest,
    RecommendResponse,
    SimilarRequest,
    SimilarResponse,
)

with bentoml.importing():
    from serving.runtime import ChampionWatcher, build_runtime

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/health", "/metrics", "/docs.json", "/"})


class UnknownItem(InvalidArgument):
    """``item_id`` is not in the served model's vocabulary (HTTP 400)."""


class InvalidFeedback(InvalidArgument):
    """The event log refused the event (contract violation, or an event_id reused with other content)."""


class KTooLarge(InvalidArgument):
    """``k`` exceeds ``settings.max_k`` (HTTP 400)."""


class RequestGuard:
    """ASGI middleware: optional ``X-API-Key`` check (401) and a request body size limit (413).

    The body is buffered up to ``max_body_bytes`` (also when no Content-Length is sent) and replayed.
    """

    def __init__(self, app: Any, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._api_key: str | None = None
        self._key_read = False

    def _key(self) -> str | None:
        if not self._key_read:
            from recloop.settings import get_settings

            self._api_key, self._key_read = get_settings().api_key, True
        return self._api_key

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
        key = self._key()
        if key and not hmac.compare_digest(headers.get(b"x-api-key", b""), key.encode()):
            await self._reject(send, 401, "missing or wrong X-API-Key header")
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            message = f"request body of {int(declared)} bytes exceeds {self.max_body_bytes}"
            await self._reject(send, 413, message)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await self._reject(send, 413, f"request body exceeds {self.max_body_bytes} bytes")
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@bentoml.service(
    name="recloop-recommender",
    workers=1,
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
        self.watcher = ChampionWatcher(self.runtime)
        self._poller = threading.Thread(target=self.watcher.run_forever, name="champion-poll", daemon=True)
        self._poller.start()

    def __is_ready__(self) -> bool:
        return self.watcher.model_loaded and all(self.core.ping_stores())

    @bentoml.api(input_spec=RecommendRequest, output_spec=RecommendResponse)
    def recommend(self, **request: Any) -> RecommendResponse:
        """Top-k items for a user (cold-start path for unknown users). Example: ``EXAMPLE_REQUEST``."""
        req = RecommendRequest.model_construct(**request)
        if req.k > self.settings.max_k:
            raise KTooLarge(f"k={req.k} exceeds max_k={self.settings.max_k}")
        out = self.core.recommend(req.user_id, req.k, req.exclude_seen, req.history)
        return RecommendResponse.model_validate(out)

    @bentoml.api(input_spec=FeedbackRequest, output_spec=FeedbackResponse)
    def feedback(self, **request: Any) -> FeedbackResponse:
        """Store one event, refresh the user's online history from the log; ack after both."""
        req = FeedbackRequest.model_construct(**request)
        lo, hi = self.settings.rating_min, self.settings.rating_max
        if req.event_type == "rating" and req.value is not None and not lo <= req.value <= hi:
            raise InvalidFeedback(f"value={req.value} outside the rating range [{lo}, {hi}]")
        try:
            out = self.core.feedback(
                req.user_id, req.item_id, req.event_type, req.value, req.timestamp, req.event_id
            )
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
        """Readiness: model loaded and both stores reachable."""
        ok_log, ok_online = self.core.ping_stores()
        loaded = self.watcher.model_loaded
        return ReadyResponse(
            ready=loaded and ok_log and ok_online,
            model_loaded=loaded,
            event_log=ok_log,
            online_store=ok_online,
            detail=self.watcher.info(),
        )

    @bentoml.api
    def model_info(self) -> ModelInfo:
        """The served version, its provenance and the last poll/load error."""
        return self.watcher.info()


Recommender.add_asgi_middleware(RequestGuard, max_body_bytes=MAX_BODY_BYTES)

__all__ = ["EXAMPLE_FEEDBACK", "EXAMPLE_REQUEST", "Recommender", "RequestGuard"]
