"""Request and response models of the ``Recommender`` service (docs/architecture.md, "How serving works").

Validation failures (missing field, wrong type, out-of-range value, malformed JSON, unknown field)
are answered by BentoML with HTTP **400** and a body
``{"error": "...", "detail": [{"loc": [<field>], "msg": ...}, ...]}`` naming the field.
Semantic errors raised by the service (``InvalidArgument`` subclasses) are also **400**, with a body
``[{"error": "<message naming the field>"}]``. A body larger than the configured limit is **413**;
a missing or wrong API key (when one is configured) is **401**.
An unknown user is not an error: it gets the cold-start path and ``cold_start: true``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from recloop.contract import (
    EVENT_TYPES,
    MAX_EVENT_ID_CHARS,
    MAX_ID_CHARS,
    MAX_POSITION,
    MAX_REQUEST_ID_CHARS,
    EventType,
    event_id_violation,
    id_violation,
    normalise_id,
    request_id_violation,
)

MAX_HISTORY = 200
MAX_K = 200  # hard schema bound; settings.max_k may lower it (checked in the service)
MAX_EXCLUDE = 500  # exclude_items per request
MAX_GENRES = 30  # genres per request
Genre = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]



def contract_id(value: str) -> str:
    """The data contract's id rule (``recloop.contract.id_violation``), then its normalisation (NFC, strip).

    Raises:
        ValueError: the rule broken (pydantic turns it into a 400 naming the field).
    """
    rule = id_violation(value)
    if rule:
        raise ValueError(rule)
    return normalise_id(value)


def contract_event_id(value: str) -> str:
    """The contract's rule of a client ``event_id`` (``recloop.contract.event_id_violation``), normalised.

    Raises:
        ValueError: the rule broken.
    """
    rule = event_id_violation(value)
    if rule:
        raise ValueError(rule)
    return normalise_id(value)


Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(contract_id)]
MAX_QUERY_CHARS = 2000  # hard schema bound; settings.query_max_chars (default 200) lowers it (checked in the service)


def _plain_text(value: str) -> str:
    """Free text without control or format characters (a query, a title), whitespace-collapsed.

    Raises:
        ValueError: a control character, or nothing but whitespace.
    """
    import unicodedata

    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in value):
        raise ValueError("must not contain control or format characters")
    value = " ".join(value.split())
    if not value:
        raise ValueError("must not be empty")
    return value


Query = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS), AfterValidator(_plain_text)]
def contract_request_id(value: str) -> str:
    """The contract's rule of a ``request_id`` (``recloop.contract.request_id_violation``), normalised.

    Raises:
        ValueError: the rule broken.
    """
    rule = request_id_violation(value)
    if rule:
        raise ValueError(rule)
    return normalise_id(value)


RequestId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_REQUEST_ID_CHARS), AfterValidator(contract_request_id)
]
EventId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_EVENT_ID_CHARS), AfterValidator(contract_event_id)
]


class _Strict(BaseModel):
    """Unknown fields are rejected so that typos (``"user"`` for ``"user_id"``) are not ignored."""

    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    """Input of ``/recommend``."""

    user_id: Id = Field(description="Raw user id (1-255 chars)")
    k: int = Field(default=10, ge=1, le=MAX_K, strict=True, description="Number of items to return")
    exclude_seen: bool = Field(
        default=True, strict=True,
        description="Drop every item the user consumed (the stored history, not only the model's window, "
        "plus the request's history). Items the user said 'not interested' to (a negative event such as "
        "skip, for negative_suppress_s) are dropped either way",
    )
    history: list[Id] | None = Field(
        default=None,
        max_length=MAX_HISTORY,
        description="Item ids to use instead of the stored history, oldest first (e.g. a new user's session)",
    )
    diversity: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Diversity re-ranking of the top candidates (settings.rerank_candidates, after masking):"
        " 0 or null = off (the model's order); MMR's lambda = diversity, DPP's theta = 1 - diversity",
    )
    reranker: Literal["mmr", "dpp"] | None = Field(
        default=None,
        description="mmr (Carbonell & Goldstein 1998) or dpp (greedy MAP, Chen et al. 2018);"
        " default settings.rerank_default",
    )
    explain: bool = Field(
        default=False, strict=True,
        description="Attach to each item the 1-3 history items it is most similar to (because) and a reason line",
    )
    exclude_items: list[Id] | None = Field(
        default=None, max_length=MAX_EXCLUDE, description="Item ids this answer must not contain",
    )
    genres: list[Genre] | None = Field(
        default=None, max_length=MAX_GENRES,
        description="Only items with at least one of these genres (catalogue attribute; unknown genre: 400)",
    )
    query: Query | None = Field(
        default=None,
        description="Free text steering the answer (e.g. 'space adventure with robots'): item scores are blended"
        " with their text's similarity to it (weight: settings.query_weight); at most settings.query_max_chars",
    )


class Because(BaseModel):
    """One history item that explains a recommendation."""

    item_id: str = Field(description="The history item's raw id")
    title: str = Field(description="Its catalogue title, or the id when unknown")
    weight: float = Field(description="Cosine similarity to the recommended item in the model's embedding space")


class ScoredItem(BaseModel):
    """One recommended item."""

    item_id: str = Field(description="Raw catalogue id")
    score: float = Field(description="Model score (higher is better; comparable within one response)")
    title: str = Field(description="Catalogue title, or the id when unknown")
    team: str | None = Field(
        default=None,
        description="Interleaving only: the arm whose list contributed this slot ('champion' | 'challenger')",
    )
    because: list[Because] | None = Field(
        default=None,
        description="explain only: the 1-3 history items most similar to this one, most similar first"
        " (null for a user without history)",
    )
    reason: str | None = Field(
        default=None, description="explain only: e.g. 'Because you rated Toy Story (1995)'",
    )
    cold_item: bool = Field(
        default=False, description="A new catalogue item (POST /items) scored from its text, before any retrain",
    )


class RecommendResponse(BaseModel):
    """Output of ``/recommend``."""

    items: list[ScoredItem] = Field(description="Top-k items, best first, distinct")
    model_version: str = Field(description="Registered model version that answered")
    variant: str = Field(description="Registry alias the version was resolved from (e.g. 'champion')")
    strategy: Literal["sequential", "history", "popularity", "fallback", "short_history_blend"] = Field(
        description="sequential: stored history; history: the request's history;"
        " popularity: no usable history; fallback: the online store was unavailable (or still owes"
        " this user a push), so the history was rebuilt from the lake and the event log (or the"
        " request's history was used; popularity when both are empty); short_history_blend: 1-2 known"
        " history items, answered by item neighbours blended with popularity because that beat the model"
        " on validation users with at most two events (the evaluate flow's choice)"
    )
    cold_start: bool = Field(description="True when the user has no stored history (cold-start path)")
    reranker: str | None = Field(
        default=None,
        description="The re-ranking applied, e.g. 'mmr:lambda=0.3' or 'dpp:theta=0.7' (null: the model's order)",
    )
    request_id: str = Field(
        default="",
        description="This answer's id (32 hex chars), recorded in the exposure log with what was shown;"
        " send it back in /feedback (with the item's position) to link the event to this answer",
    )
    experiment_id: str | None = Field(default=None, description="The online experiment this answer is part of")
    query_weight: float | None = Field(
        default=None, description="With a query: the weight its text similarity got (settings.query_weight)")
    arm: str | None = Field(
        default=None,
        description="The experiment arm that answered: 'champion' | 'challenger' (A/B test) or 'interleaved'"
        " (team-draft interleaving; each item's team says which arm contributed it)",
    )


class FeedbackRequest(_Strict):
    """Input of ``/feedback``."""

    user_id: Id = Field(description="Raw user id")
    item_id: Id = Field(description="Raw item id; an unknown item is stored and used after retraining")
    event_type: EventType = Field(description=f"One of {', '.join(EVENT_TYPES)}")
    value: float | None = Field(default=None, ge=-1e6, le=1e6, description="e.g. a rating 1-5")
    timestamp: datetime | None = Field(default=None, description="Event time (ISO 8601); default: now, UTC")
    event_id: EventId | None = Field(
        default=None,
        description="Idempotency key (1-128 chars; default a new UUID). A retry with the same id is"
        " acknowledged once (without a timestamp it reuses the stored one); the same id with other"
        " content is refused (400)",
    )
    request_id: RequestId | None = Field(
        default=None,
        description="The /recommend answer this event reacts to (its request_id); links the event to"
        " that exposure for online metrics. Not part of the event's identity",
    )
    position: int | None = Field(
        default=None, ge=1, le=MAX_POSITION, strict=True,
        description="1-based position of the item in that answer",
    )


class FeedbackResponse(BaseModel):
    """Output of ``/feedback``: returned only after the log write and the online refresh."""

    event_id: str = Field(description="The stored event's id")
    inserted: bool = Field(description="False when the event_id was already stored (idempotent replay)")
    known_item: bool = Field(description="False when the item is not in the served model's vocabulary")
    recent_items: int = Field(description="Length of the user's refreshed online sequence")
    degraded: bool = Field(
        default=False,
        description="True when the event is stored but the online store could not be refreshed: the"
        " push is retried in the background and the next recommend rebuilds the history from the log",
    )
    role: Literal["positive", "negative", "context"] = Field(
        default="positive",
        description="What the event means under the event policy: positive (history, training target),"
        " negative ('not interested': the item is suppressed for this user for a while, never a target)"
        " or context (stored only)",
    )


class SimilarRequest(_Strict):
    """Input of ``/similar_items``."""

    item_id: Id = Field(description="Raw item id")
    k: int = Field(default=10, ge=1, le=MAX_K, strict=True, description="Number of neighbours")


class SimilarResponse(BaseModel):
    """Output of ``/similar_items``: cosine similarity over the model's item embeddings."""

    items: list[ScoredItem]
    model_version: str


class ModelInfo(BaseModel):
    """Output of ``/model_info`` and part of ``/ready``."""

    model_name: str
    alias: str
    version: str | None
    run_id: str | None
    n_items: int
    vocab_version: str | None
    loaded_at: str | None = Field(description="UTC ISO time the served version was swapped in")
    last_poll_at: str | None
    last_error: str | None = Field(description="Last failed load/poll, kept until a load succeeds")
    experiment: dict | None = Field(
        default=None,
        description="The running online experiment as served (id, mode, weights, both versions), else None",
    )
    text: dict | None = Field(
        default=None,
        description="Text-aware items: item_repr, serves_new_items (false for an ID-only model: new items wait for"
        " the next retrain), new_items_served, reason, last_error",
    )


class ReadyResponse(BaseModel):
    """Output of ``/ready``."""

    ready: bool
    model_loaded: bool
    event_log: bool
    online_store: bool
    status: Literal["ok", "degraded"] = Field(
        default="ok",
        description="degraded: a model serves, but not the alias's version (it failed to load; the last"
        " good version serves), or the registry or a store is unreachable. /readyz stays 200 while a"
        " model serves",
    )
    reason: str | None = Field(default=None, description="Why the service is degraded (None when ok)")
    online_store_empty: bool = Field(
        default=False, description="The online store lost its rows (e.g. a Redis restarted empty); re-sync runs"
    )
    pending_pushes: int = Field(
        default=0, description="Users whose online history is behind the event log (pushes being retried)"
    )
    detail: ModelInfo


class ItemRequest(_Strict):
    """Input of ``/items``: a new catalogue item (``recloop.catalog``; stored where every worker sees it)."""

    item_id: Id = Field(description="Raw item id (the contract's id rule)")
    title: Annotated[str, StringConstraints(min_length=1, max_length=500), AfterValidator(_plain_text)] = Field(
        description="Title (1-500 characters, no control characters)")
    genres: list[Genre] | None = Field(default=None, max_length=MAX_GENRES, description="Genres, e.g. ['Sci-Fi']")
    text: Annotated[str, StringConstraints(max_length=4000)] | None = Field(
        default=None, description="Free text (a description), at most 4000 characters")


class ItemResponse(BaseModel):
    """Output of ``/items``."""

    item_id: str = Field(description="The stored item's id")
    inserted: bool = Field(description="False when the item was already in the catalogue (title/text updated)")
    known_item: bool = Field(description="True when the served model was trained on it (it has an ID embedding)")
    served_now: bool = Field(
        description="True when the served model recommends it now (text-aware model; every worker within"
        " settings.catalog_ttl_s); False for an ID-only model: it waits for the next retrain")
    reason: str | None = Field(default=None, description="Why it is not served now (None when it is)")
    n_catalogue: int = Field(description="Items in the new-item catalogue after the call")


class BlocklistRequest(_Strict):
    """Input of ``/blocklist``: change or read the catalogue-wide blocklist (every worker sees it)."""

    action: Literal["add", "remove", "list"] = Field(description="add | remove items, or list them")
    item_ids: list[Id] = Field(default_factory=list, max_length=1000, description="Raw item ids (add/remove)")
    kind: Literal["blocked", "retired"] = Field(default="blocked", description="add: why the item is hidden")
    reason: str | None = Field(default=None, max_length=500, description="add: free text")


class BlocklistResponse(BaseModel):
    """Output of ``/blocklist``."""

    changed: list[str] = Field(description="add: ids newly listed; remove: ids that were listed; list: []")
    items: list[dict] = Field(description="The blocklist after the call: [{item_id, kind, reason, added_at}]")


class ForgetRequest(_Strict):
    """Input of ``/forget``: delete a user from every store, serving state and (at the next retrain) the model."""

    user_id: Id = Field(description="Raw user id to forget")


class ForgetResponse(BaseModel):
    """Output of ``/forget``: the deletion receipt (``recloop.forget``); never the raw id."""

    user_hash: str = Field(description="Salted hash of the user id (HMAC-SHA256): the tombstone and receipt key")
    status: Literal["done", "pending"] = Field(
        description="done: deleted everywhere; pending: the tombstone holds (serving and ingestion refuse the "
        "user) and the deletion finishes when the loop releases its lock")
    rows: dict[str, int] = Field(description="Rows removed per store (empty while pending)")
    seconds: dict[str, float] = Field(description="Time per store and in total (s)")
    new_request: bool = Field(description="False when the user had been forgotten before (re-run)")


EXAMPLE_REQUEST = RecommendRequest(user_id="1", k=10)
EXAMPLE_FEEDBACK = FeedbackRequest(user_id="1", item_id="50", event_type="click")
