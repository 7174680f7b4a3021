"""The in-process serving core: recommend, feedback and similar items over one served model.

Framework-free (no BentoML): ``serving/service.py`` is a thin HTTP adapter over ``RecommenderCore``,
and tests drive this class directly. Collaborators are passed in and only need these methods:

- online store: ``recent_items(user_id) -> list[str] | None`` and
  ``push_recent_items(user_id, items, event_ts)`` (``featurestore/online.py``, Feast);
- event log: ``append_and_recent(event, n) -> (inserted, recent_items)`` atomic per user and
  ``recent_items(user_id, n)`` (``recloop/eventlog.py``);
- model: any registered sequential model (``models.contract``: ``score``, ``item_embeddings``).

Ranking (scoring, masking, top-k, ties) is ``models.ranking``'s, the one ranking path.

Read-your-writes: ``feedback`` returns only after the event is in the log and the user's online
sequence has been overwritten with the last ``max_seq_len`` items *read back from the log*. Pushes
for one user are ordered across processes: the push runs while the event log holds the user's write
lock (``EventLog.append_and_recent(..., while_locked=)``: PostgreSQL's per-user advisory lock, SQLite's
database write lock), so no worker or replica can overwrite a newer list with an older one, and the
next ``recommend`` from any of them reflects an acknowledged event. (An event store without that lock,
e.g. a test double, falls back to the in-process stripe lock and a re-read until the pushed tail is
current.)

Online-store outages (``featurestore/online.py`` bounds each call with a deadline and a circuit
breaker): ``recommend`` rebuilds the history from its sources (the lake snapshot ``base_history``
plus the log's newer events) and answers ``strategy="fallback"``; ``feedback`` whose event is in the
log answers ``degraded=True`` and its push is retried by a background thread (one queue per
process; each retry derives the list from the log under the user's lock, so pushes stay ordered).
Until a user's retried push lands, ``recommend`` reads that user from the sources too, so
read-your-writes holds through the outage. ``resync_online`` rewrites every user's sequence from the
sources (start-up when the store is empty, ``recloop online resync``, and the background check).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from models.exploration import DeferredPropensities, ExplorationPolicy, explore
from models.ranking import encode_history, mask_scores, score_histories, seen_mask, top_k_items
from models.rerank import RERANKERS
from models.rerank import rerank as rerank_positions
from models.short_history import SHORT_HISTORY_MAX, blend_scores, neighbour_table
from models.text_items import ItemTable, blend_query
from models.vocab import PAD_IDX, ItemVocabulary
from recloop.experiments import assign_arm
from recloop.forget import UserForgotten, log_id
from recloop.interleaving import TEAM_A, TEAM_B, request_rng, team_draft
from recloop.policy import DEFAULT_POLICY, EventPolicy, event_role
from serving.explain import explain_items

logger = logging.getLogger(__name__)

N_LOCK_STRIPES = 256
MAX_REFRESH_ROUNDS = 5
#: A user id no client sends, written last by ``resync_online``: a store that lacks it lost its rows.
SENTINEL_USER = "__recloop_online_sentinel__"
N_EMPTY_PROBES = 3  # users of base_history read by the emptiness check, besides the sentinel
PUSH_RETRY_S = 0.5  # pause of the background pusher after a failed push
LOG_SEQ_OVERLAP = 1000  # re-read this many seqs below the mark (PostgreSQL may commit a smaller seq late)


class OnlineStore(Protocol):
    def recent_items(self, user_id: str) -> list[str] | None: ...

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> None: ...


class EventStore(Protocol):
    def append_and_recent(
        self, event: dict[str, Any], n: int, after_ts: datetime | None = None
    ) -> tuple[bool, list[str]]: ...

    def recent_items(self, user_id: str, n: int, after_ts: datetime | None = None) -> list[str]: ...

    def get(self, event_id: str) -> dict[str, Any] | None: ...


class ExposureSink(Protocol):
    """Records one answer off the request path (``recloop.exposures.ExposureLog.record``)."""

    def record(self, request_id: str, user_id: str, model_version: str, items: list[tuple[str, float]],
               **kw: Any) -> bool: ...


#: user_id -> (last items in the lake, oldest first; timestamp of the user's newest lake event)
BaseHistory = Mapping[str, tuple[list[str], datetime]]


class UnknownItemError(KeyError):
    """An item id the served model does not know (``similar_items``)."""


class UnknownGenreError(ValueError):
    """A ``genres`` filter names a genre the served catalogue does not have."""


@dataclass(frozen=True)
class ServedModel:
    """Everything one model version needs to answer requests; swapped in as one reference.

    Attributes:
        model: torch module in eval mode with ``score(item_idx) -> (batch, n_items + 1)``.
        vocab: its ``ItemVocabulary``.
        version: registered model version (str).
        seq_len: history length the model takes (left-padded with 0).
        unit_emb: (n_items + 1, d_model) L2-normalised item embeddings (row 0 zero).
        popularity: (n_items + 1,) cold-start scores normalised to [0, 1] (count / max count), column 0 = -inf.
        titles: item_id -> title (may be partial).
        genre_masks: genre -> (n_items + 1,) bool, the items carrying it (the ``genres`` filter).
        fresh: (n_items + 1,) bool, items added to the catalogue recently (freshness boost), or None.
        short_history: (neighbours, sims, weight) of the short-history blend (``attach_short_history``), or
            None: the model answers users with 1-2 known items too.
        cold_items: ids of new catalogue items a text-aware model scores from their text (appended after the
            trained catalogue by ``serving.catalog.TextCatalog``; flagged ``cold_item`` in answers).
    """

    model: Any
    vocab: ItemVocabulary
    version: str
    run_id: str | None
    seq_len: int
    unit_emb: torch.Tensor
    popularity: np.ndarray
    titles: dict[str, str]
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    genre_masks: dict[str, np.ndarray] = field(default_factory=dict)
    fresh: np.ndarray | None = None
    short_history: tuple[np.ndarray, np.ndarray, float] | None = None
    cold_items: frozenset[str] = frozenset()


class Ranked(NamedTuple):
    """One model's slate for a request (``RecommenderCore._rank``)."""

    items: list[dict[str, Any]]
    strategy: str
    context: list[str]
    propensities: Sequence[float | None]  # a ``DeferredPropensities`` for Plackett-Luce (read by the writer)
    pool_size: int
    policy: str


def policy_text(policy: ExplorationPolicy) -> str:
    """The exposure log's ``policy`` text of an exploration policy (<= 32 chars; ``ExplorationPolicy.parse``
    reads it back): ``greedy``, ``epsilon:0.1``, ``epsilon:0.1,n=50``, ``plackett_luce:tau=0.5,n=50``."""
    if policy.name == "epsilon":
        bound = "" if policy.top_n is None else f",n={policy.top_n}"
        return f"epsilon:{policy.epsilon:g}{bound}"[:32]
    if policy.name == "plackett_luce":
        return f"plackett_luce:tau={policy.temperature:g},n={policy.n_candidates}"[:32]
    return "greedy"


def _request_seed(request_id: str) -> int:
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class RerankStage:
    """A request's re-ranking and attribute filter (``RecommenderCore._stage``).

    Attributes:
        method: "mmr" | "dpp", or None when re-ranking is off (diversity 0 and no freshness boost).
        diversity: in [0, 1] (MMR's λ; DPP's θ = 1 - diversity; ``models.rerank``).
        freshness_boost: boost of a fresh item in units of the candidates' score range (0 = off).
        n_candidates: the top-N (after masking) the re-ranker reorders.
        allowed: (n_items + 1,) bool genre filter, or None for every item.
    """

    method: str | None
    diversity: float
    freshness_boost: float
    n_candidates: int
    allowed: np.ndarray | None = None

    def describe(self) -> str | None:
        """The response's ``reranker``: "mmr:lambda=0.3", "dpp:theta=0.7" (+ ",fresh=0.1"); None when off."""
        if self.method is None:
            return None
        knob = f"lambda={self.diversity:g}" if self.method == "mmr" else f"theta={1.0 - self.diversity:g}"
        return f"{self.method}:{knob}" + (f",fresh={self.freshness_boost:g}" if self.freshness_boost > 0 else "")


def rerank_scores(scores: np.ndarray, unit_emb: torch.Tensor, k: int, stage: RerankStage,
                  fresh: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank the top ``stage.n_candidates`` of a masked score row (``models.rerank.rerank``).

    Args:
        scores: (n_items + 1,) masked scores (-inf = masked: never a candidate).
        unit_emb: (n_items + 1, d_model) L2-normalised item embeddings (the similarity).
        k: slots (>= 1).
        stage: method, diversity, freshness boost, number of candidates.
        fresh: (n_items + 1,) bool fresh items (the boost), or None.
    Returns:
        (adjusted, order): ``adjusted`` is ``scores`` with the candidates' values permuted so that they
        descend along ``order`` (the re-ranked k, then the other candidates in the model's order), so any
        exploration policy draws from the re-ranked order; ``order`` is (n_candidates',) item_idx.
    """
    cand = top_k_items(scores, stage.n_candidates)  # (n_candidates,) best first, finite only
    if cand.shape[0] == 0 or stage.method is None:
        return scores, cand
    boost = fresh[cand] if fresh is not None and stage.freshness_boost > 0 else None
    emb = unit_emb.numpy() if isinstance(unit_emb, torch.Tensor) else np.asarray(unit_emb)  # a view, no copy
    pos = rerank_positions(scores[cand], emb[cand], min(k, cand.shape[0]),
                           stage.method, stage.diversity, boost, stage.freshness_boost)  # (k',)
    rest = np.ones(cand.shape[0], dtype=bool)
    rest[pos] = False  # the other candidates, in the model's order
    order = cand[np.concatenate([pos, np.flatnonzero(rest)])]
    adjusted = scores.copy()
    adjusted[order] = scores[cand]  # scores[cand] descends: the i-th best value goes to the i-th of order
    return adjusted, order


@dataclass(frozen=True)
class ExperimentArms:
    """A running online experiment as serving needs it: its definition and both arms' models, pinned to
    registry versions at start (swapped in and out as one reference, like ``ServedModel``).

    Attributes:
        experiment_id, mode ("ab" | "interleave"), weights (champion, challenger), salt: the stored
            definition (``recloop.experiments.OnlineExperiment``).
        champion, challenger: the two arms' served models.
    """

    experiment_id: str
    mode: str
    weights: tuple[float, float]
    salt: str
    champion: ServedModel
    challenger: ServedModel
    exploration: tuple[ExplorationPolicy | None, ExplorationPolicy | None] = (None, None)
    rerank: tuple[tuple[str, float] | None, tuple[str, float] | None] = (None, None)

    def rerank_of(self, arm: str, diversity: float | None, reranker: str | None) -> tuple[float | None, str | None]:
        """The (diversity, reranker) an arm's slate uses: the request's own where it set them, else the arm's
        (``recloop.experiments.parse_rerank``: "mmr:0.3" → ("mmr", 0.3)), else none."""
        own = self.rerank[0] if arm == TEAM_A else self.rerank[1]
        if own is None or diversity is not None:
            return diversity, reranker
        return own[1], reranker or own[0]

    def exploration_of(self, arm: str, default: ExplorationPolicy | None) -> ExplorationPolicy | None:
        """The arm's exploration policy (the experiment's, else the service's ``default``)."""
        own = self.exploration[0] if arm == TEAM_A else self.exploration[1]
        return own if own is not None else default

    def served(self, arm: str) -> ServedModel:
        """The model of ``arm`` ("champion" | "challenger")."""
        return self.champion if arm == TEAM_A else self.challenger

    def describe(self) -> dict[str, Any]:
        """For ``/model_info``: the definition and the versions served."""
        return {"experiment_id": self.experiment_id, "mode": self.mode, "weights": list(self.weights),
                "champion_version": self.champion.version, "challenger_version": self.challenger.version,
                "exploration": [None if p is None else policy_text(p) for p in self.exploration],
                "rerank": [None if r is None else f"{r[0]}:{r[1]:g}" for r in self.rerank]}


def score_history(model: Any, seq_len: int, idx: np.ndarray) -> np.ndarray:
    """Score the whole catalogue after one history (``models.ranking.score_histories``).

    Args:
        idx: (n,) int64 item_idx, oldest first; only the last ``seq_len`` are used.
    Returns:
        (n_items + 1,) float64 scores; column 0 (padding) is -inf.
    """
    scores = score_histories(model, [idx], max_len=seq_len)[0].astype(np.float64)  # (n_items + 1,)
    scores[PAD_IDX] = -np.inf
    return scores


def build_served(
    model: Any,
    vocab: ItemVocabulary,
    version: str,
    run_id: str | None = None,
    extra: dict[str, Any] | None = None,
    titles: dict[str, str] | None = None,
    popularity: dict[str, float] | None = None,
    genres: dict[str, list[str]] | None = None,
    fresh_items: Iterable[str] | None = None,
) -> ServedModel:
    """Prepare a loaded model for serving and smoke-score it (raises if it cannot answer).

    Cold-start popularity: ``popularity`` ({item_id: count}, e.g. from the lake), else
    ``extra["item_popularity"]`` when the checkpoint carries it, else the L2 norm of each item's
    embedding (with tied output embeddings, frequent items get larger norms); divided by its maximum, so
    a cold-start answer's scores lie in [0, 1].
    ``genres`` (item_id -> genres) feeds the ``genres`` filter, ``fresh_items`` the freshness boost.

    Raises:
        ValueError: the model's score width does not match the vocabulary, or scores are not finite.
    """
    extra = extra or {}
    if hasattr(model, "eval"):
        model.eval()
    if getattr(model, "uses_text", False):
        model = ItemTable(model)  # a text-aware model's item vectors, computed once (models.text_items)
    seq_len = int(model.config.max_seq_len)
    smoke = score_history(model, seq_len, np.arange(1, min(len(vocab), 3) + 1, dtype=np.int64))
    if smoke.shape != (len(vocab) + 1,) or not np.isfinite(smoke[1:]).all():
        raise ValueError(
            f"smoke score failed for version {version}: shape {smoke.shape}, expected ({len(vocab) + 1},)"
            " with finite values"
        )
    emb = model.item_embeddings().detach().float()  # (n_items + 1, d_model)
    unit = torch.nn.functional.normalize(emb, dim=1)
    unit[PAD_IDX] = 0.0
    counts = popularity or extra.get("item_popularity")
    if isinstance(counts, dict) and counts:
        pop = np.zeros(len(vocab) + 1, dtype=np.float32)
        known = {k: v for k, v in counts.items() if str(k) in vocab}
        pop[vocab.encode(list(known))] = np.asarray(list(known.values()), dtype=np.float32)
        pop[PAD_IDX] = -np.inf
    else:
        pop = emb.norm(dim=1).numpy().astype(np.float32)
        pop[PAD_IDX] = -np.inf
    top = float(pop[1:].max(initial=0.0))
    if top > 0:
        pop[1:] = np.maximum(pop[1:], 0.0) / top  # counts / max count in [0, 1]
    titles = titles if titles is not None else dict(extra.get("titles") or {})
    served = ServedModel(model, vocab, str(version), run_id, seq_len, unit, pop, titles)
    return attach_catalogue(served, genres, fresh_items)


def attach_catalogue(served: ServedModel, genres: Mapping[str, Iterable[str]] | None = None,
                     fresh_items: Iterable[str] | None = None) -> ServedModel:
    """``served`` with the catalogue's genre masks (the ``genres`` filter) and fresh items (the boost).

    Args:
        genres: item_id -> genres (items the vocabulary does not know are ignored); None leaves them.
        fresh_items: item ids added recently (``serving.runtime.load_catalogue``); None leaves them.
    Returns:
        A new ``ServedModel`` (one reference to swap in), or ``served`` itself when both are empty.
    """
    fresh_items = None if fresh_items is None else list(fresh_items)
    if not genres and not fresh_items:
        return served
    vocab = served.vocab
    genre_masks = dict(served.genre_masks)
    for item_id, item_genres in (genres or {}).items():
        if str(item_id) in vocab:
            idx = int(vocab.encode([str(item_id)])[0])
            for g in item_genres:
                genre_masks.setdefault(str(g), np.zeros(len(vocab) + 1, dtype=bool))[idx] = True
    fresh = served.fresh
    if fresh_items is not None:
        fresh = np.zeros(len(vocab) + 1, dtype=bool)
        known = [str(i) for i in fresh_items if str(i) in vocab]
        fresh[vocab.encode(known)] = True
    return replace(served, genre_masks=genre_masks, fresh=fresh)


def short_history_weight(tags: Mapping[str, str] | None) -> float | None:
    """The blend weight a model version's tags choose for users with 1-2 events, or None (the model).

    The evaluate flow tags each version ``short_history.strategy`` ("model" | "short_history_blend") and
    ``short_history.weight`` (``flows.evaluate.short_history_tags``). Default, for a version without the tags
    (evaluated before the choice existed) or an unreadable weight: None, the model serves every history.
    """
    tags = tags or {}
    if tags.get("short_history.strategy") != "short_history_blend":
        return None
    try:
        weight = float(tags.get("short_history.weight", ""))
    except ValueError:
        return None
    return weight if 0.0 <= weight <= 1.0 else None


def attach_short_history(served: ServedModel, sequences: Iterable[Sequence[str]], weight: float | None
                         ) -> ServedModel:
    """``served`` answering users with 1-2 known items by the neighbours-plus-popularity blend at ``weight``.

    Args:
        sequences: users' positive item ids (e.g. the lake snapshot's windows, ``base_history``): the
            item-item cosine neighbours (``models.short_history.neighbour_table``); ids the vocabulary does
            not know are dropped. The popularity part is ``served.popularity`` (in [0, 1]).
        weight: the evaluate flow's choice (``short_history_weight``); None leaves ``served`` as it is.
    Returns:
        A new ``ServedModel`` (or ``served`` itself when ``weight`` is None or there are no sequences).
    """
    if weight is None:
        return served
    seqs = [idx for idx in (encode_history(served.vocab, s) for s in sequences) if len(idx)]
    if not seqs:
        return served
    nb, sims, _ = neighbour_table(seqs, len(served.vocab))
    return replace(served, short_history=(nb, sims, float(weight)))


class RecommenderCore:
    """recommend / feedback / similar_items over the current ``ServedModel`` (thread-safe)."""

    def __init__(
        self,
        served: ServedModel,
        online: OnlineStore,
        events: EventStore,
        *,
        max_seq_len: int,
        variant: str = "",
        source: str = "api",
        base_history: BaseHistory | None = None,
        consumed: Mapping[str, frozenset[str]] | None = None,
        suppressed: Mapping[str, Mapping[str, datetime]] | None = None,
        policy: EventPolicy | None = None,
        exposures: ExposureSink | None = None,
        exploration: ExplorationPolicy | None = None,
        blocklist: Any = None,
        rerank_default: str = "mmr",
        rerank_candidates: int = 100,
        freshness_boost: float = 0.0,
        event_types: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self._served = served
        #: the catalogue-wide blocklist (``recloop.blocklist.CachedBlocklist``: ``item_ids()``); None = none
        self.blocklist = blocklist
        #: new catalogue items and text queries (``serving.catalog.TextCatalog``); None = neither
        self.text: Any = None
        #: weight of a query's text similarity in ``recommend`` (``settings.query_weight``)
        self.query_weight = 0.5
        if rerank_default not in RERANKERS:
            raise ValueError(f"rerank_default={rerank_default!r}; expected one of {list(RERANKERS)}")
        self.rerank_default = rerank_default
        self.rerank_candidates = rerank_candidates
        self.freshness_boost = freshness_boost
        #: user_id -> {item_id: event type of the newest positive} in the lake snapshot (explanations' verb)
        self.event_types: Mapping[str, Mapping[str, str]] = event_types or {}
        self.base_history: BaseHistory = base_history or {}
        #: user_id -> every positive item of the user's lake history (the lake snapshot's "seen" set)
        self.consumed: Mapping[str, frozenset[str]] = consumed or {}
        #: user_id -> {item_id: until}: the lake snapshot's negatives still in force ("not interested")
        self.suppressed: Mapping[str, Mapping[str, datetime]] = suppressed or {}
        self.policy = policy or DEFAULT_POLICY
        #: where each answer is recorded (``recloop.exposures.ExposureLog``); None = not recorded
        self.exposures = exposures
        #: the service's exploration policy (None/greedy: the top k; an experiment may set one per arm)
        self.exploration = exploration
        #: the running online experiment's two pinned models (None: the champion alone, today's cost)
        self.experiment_arms: ExperimentArms | None = None
        self.online = online
        self.events = events
        #: items of history kept per user: the lake window, the log tail read after it, the lists pushed online.
        #: ``serving.runtime`` sets it to ``served_history_len`` (at least every served model's max_seq_len).
        self.max_seq_len = max_seq_len
        self.variant = variant
        self.source = source
        self._locks = [threading.Lock() for _ in range(N_LOCK_STRIPES)]
        # Online pushes owed after a failure (users, oldest first), drained by one daemon thread.
        self._pending: dict[str, None] = {}
        self._pending_cv = threading.Condition()
        self._sync_thread: threading.Thread | None = None
        self._sync_stop = threading.Event()
        self._check_empty = False  # the thread also checks for an emptied store (start_online_sync)
        self._check_interval_s = 10.0
        self.push_retry_s = PUSH_RETRY_S
        self._resync_lock = threading.Lock()
        self.resyncing = False
        self.last_resync: dict[str, Any] | None = None
        #: forgotten users (``recloop.forget.TombstoneCheck``: ``is_forgotten``, ``forgotten_ids``); None = none.
        #: A forgotten user is unknown to ``recommend`` (no stored history, no exposure) and refused by ``feedback``.
        self.tombstones: Any = None
        self._tombstones_swept = 0  # the tombstone count at the last sweep_forgotten

    @property
    def served(self) -> ServedModel:
        return self._served

    def swap(self, served: ServedModel) -> None:
        """Serve ``served`` from now on (one reference assignment; in-flight requests keep the old one)."""
        old = self._served.version
        self._served = served
        logger.info("model swapped old_version=%s new_version=%s", old, served.version)

    def current_served(self) -> ServedModel:
        """The served model as a request sees it: with the catalogue's new items appended when it is text-aware
        (``serving.catalog.TextCatalog.current``, cached per model and catalogue version), else as swapped in."""
        return self._with_new_items(self._served)

    def _with_new_items(self, served: ServedModel) -> ServedModel:
        """``served`` with the catalogue's new items appended when it is text-aware (any arm's model too)."""
        return served if self.text is None else self.text.current(served)

    def _blend_query(self, served: ServedModel, scores: np.ndarray, query: str) -> np.ndarray:
        """``scores`` blended with the items' text similarity to ``query`` (``models.text_items.blend_query``).

        Raises:
            ValueError: the service has no text support (no query encoder).
        """
        if self.text is None:
            raise ValueError("query: this service has no text encoder")
        sims = self.text.query_sims(served, query)  # (n_rows,)
        return blend_query(scores, sims, self.query_weight)

    def _lock(self, user_id: str) -> threading.Lock:
        return self._locks[zlib.crc32(user_id.encode()) % N_LOCK_STRIPES]

    def _items(self, served: ServedModel, scores: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Top-k of ``scores`` ((n_items + 1,), -inf = excluded) as response items, best first."""
        top = top_k_items(scores, k)
        ids = served.vocab.decode(top)
        return [
            {"item_id": i, "score": float(scores[t]), "title": served.titles.get(i, i)}
            for i, t in zip(ids, top, strict=True)
        ]

    def history_from_sources(self, user_id: str) -> list[str]:
        """The user's history rebuilt without the online store: the lake snapshot (``base_history``)
        followed by the log's events stamped after it, the last ``max_seq_len`` (what ``feedback``
        pushes). An unreadable log leaves the lake part only.
        """
        base, base_ts = self.base_history.get(user_id, ([], None))
        try:
            tail = list(self.events.recent_items(user_id, self.max_seq_len, after_ts=base_ts))
        except Exception as err:  # noqa: BLE001 - the lake part still serves
            logger.warning("event log not readable; history from the lake only user=%s error=%s",
                           log_id(user_id), err)
            tail = []
        return (list(base) + tail)[-self.max_seq_len:]

    def masked_items(self, user_id: str, history: list[str], stored: list[str] | None,
                     now: datetime | None = None) -> tuple[set[str], set[str]]:
        """(consumed, suppressed) of a user, from one read of the log (``EventLog.user_state``).

        consumed: the lake snapshot's positives of the user (``consumed``), the log's positives received
        after that snapshot (all of them), the stored online window and the history the scores were
        computed from (a request's ``history``). suppressed: the items a negative still hides ("not
        interested", the lake snapshot's and the log's, ``policy.suppress_s``). An unreadable log leaves
        its part out (logged): the lake snapshot and the online window still apply.
        """
        consumed, suppressed, _ = self._user_masks(user_id, history, stored, now)
        return consumed, suppressed

    def _user_masks(self, user_id: str, history: list[str], stored: list[str] | None,
                    now: datetime | None = None) -> tuple[set[str], set[str], dict[str, str]]:
        """``masked_items`` plus the log's event type of each positive it read (item_id -> type of the newest),
        the explanations' verb: one read of the log (``EventLog.user_state_typed``; a store with only
        ``user_state`` gives no types)."""
        now = now or datetime.now(UTC)
        consumed = set(self.consumed.get(user_id, ())) | set(stored or ()) | set(history)
        suppressed = {i for i, until in self.suppressed.get(user_id, {}).items() if until > now}
        types: dict[str, str] = {}
        typed = getattr(self.events, "user_state_typed", None)
        user_state = typed or getattr(self.events, "user_state", None)
        if user_state is not None:
            _, base_ts = self.base_history.get(user_id, ([], None))
            try:
                log_consumed, log_suppressed = user_state(user_id, after_ts=base_ts, now=now)
            except Exception as err:  # noqa: BLE001 - the snapshot's part still masks
                logger.warning("event log not readable; seen set without it user=%s error=%s", log_id(user_id), err)
            else:
                if typed is not None:
                    types = dict(log_consumed)
                consumed |= set(log_consumed)
                suppressed.update(log_suppressed)
        return consumed, suppressed, types

    def seen_items(self, user_id: str, history: list[str], stored: list[str] | None,
                   now: datetime | None = None) -> set[str]:
        """What ``exclude_seen`` masks: everything the user consumed, not only the model's window, and
        what the user said "not interested" to (``masked_items``: consumed | suppressed)."""
        consumed, suppressed = self.masked_items(user_id, history, stored, now)
        return consumed | suppressed

    def recommend(
        self, user_id: str, k: int = 10, exclude_seen: bool = True, history: list[str] | None = None, *,
        diversity: float | None = None, reranker: str | None = None, explain: bool = False,
        exclude_items: Iterable[str] | None = None, genres: Iterable[str] | None = None,
        query: str | None = None,
    ) -> dict[str, Any]:
        """Top-k items for a user.

        ``query`` (free text, e.g. "space adventure with robots") steers the answer: each item's score is blended
        with its text's similarity to the query (``models.text_items.blend_query``, weight ``query_weight``);
        the answer then carries ``query_weight``. New catalogue items (text-aware models) carry ``cold_item``.

        History: the request's ``history`` if given, else the online store's recent items. A user
        without stored history is a cold start: the model on the given history if it has known
        items, else popularity. When the online store fails, is late or skipped (or still owes this
        user a push), the stored history is rebuilt from its sources (``history_from_sources``) and
        the strategy is ``"fallback"``; the request's ``history``, if given, is still the one used.

        Every answer gets a fresh ``request_id`` and, with an exposure sink, is recorded as an
        exposure (what was shown, by which version, from which history) off the request path.

        Business rules mask like seen items (and are recorded with them in the exposure): ``exclude_items``,
        the catalogue-wide blocklist (``self.blocklist``, shared by every worker); ``genres`` keeps only
        items with one of those genres. Re-ranking (``diversity`` > 0, ``reranker`` "mmr" | "dpp",
        default ``rerank_default``; or a freshness boost) reorders the top ``rerank_candidates`` left after
        masking (``_rank``); exploration then draws from that order. ``explain`` adds ``because`` and
        ``reason`` to each item (``serving.explain``; none for a user without history).

        Returns:
            dict with items [{item_id, score, title}], model_version, variant, strategy, cold_start,
            request_id (32 hex chars; send it back with ``feedback`` to link the event to this answer),
            reranker (the re-ranking applied, or None). A cold-start (popularity) answer's scores are in [0, 1].
        Raises:
            UnknownGenreError: a genre of ``genres`` is not in the served catalogue.
            ValueError: ``diversity`` outside [0, 1] or an unknown ``reranker``.
        """
        served = self.current_served()  # one read: a concurrent swap does not mix versions
        arms = self.experiment_arms  # one read: start/stop of an online experiment is atomic per request
        if self._forgotten(user_id):
            return self._forgotten_answer(served, k, history, exclude_items)
        stored: list[str] | None = None
        fallback = user_id in self._pending  # its online row is behind the log until the retry lands
        if not fallback:
            try:
                stored = self.online.recent_items(user_id)
            except Exception as err:  # noqa: BLE001 - any online failure degrades to the sources
                fallback = True
                logger.debug("online read failed; fallback user=%s error=%s", log_id(user_id), err)
        if fallback:
            stored = self.history_from_sources(user_id)
        cold_start = not stored
        hist_ids = history if history is not None else (stored or [])
        consumed, suppressed, log_types = self._user_masks(user_id, hist_ids, stored)
        seen = consumed | suppressed if exclude_seen else suppressed  # "not interested" holds either way
        seen |= set(exclude_items or ()) | self._blocked()  # business rules: this request's, the catalogue's
        stage = self._stage(served, diversity, reranker, genres)
        request_id = uuid.uuid4().hex
        experiment_id = arm = None
        teams: list[str] | None = None
        cold_items: frozenset[str] | None = None  # interleaving: either arm's new items
        if arms is None:
            ranked = self._rank(served, hist_ids, seen, k, user_id, self.exploration, request_id, stage, query=query)
        elif arms.mode == "ab":
            arm = assign_arm(arms.salt, user_id, arms.weights)
            served = self._with_new_items(arms.served(arm))
            experiment_id = arms.experiment_id
            stage = self._stage(served, *arms.rerank_of(arm, diversity, reranker), genres)
            ranked = self._rank(served, hist_ids, seen, k, user_id, arms.exploration_of(arm, self.exploration),
                                request_id, stage, query=query)
        else:  # team-draft interleaving of the two arms' greedy lists (two forward passes plus the merge)
            experiment_id, arm = arms.experiment_id, "interleaved"
            champion, challenger = self._with_new_items(arms.champion), self._with_new_items(arms.challenger)
            stage = self._stage(champion, *arms.rerank_of(TEAM_A, diversity, reranker), genres)
            a = self._rank(champion, hist_ids, seen, k, user_id, stage=stage, query=query)
            b = self._rank(challenger, hist_ids, seen, k, user_id,
                           stage=self._stage(challenger, *arms.rerank_of(TEAM_B, diversity, reranker), genres),
                           query=query)
            merged, teams = team_draft([x["item_id"] for x in a.items], [x["item_id"] for x in b.items], k,
                                       request_rng(request_id))
            by_team = {TEAM_A: {x["item_id"]: x for x in a.items}, TEAM_B: {x["item_id"]: x for x in b.items}}
            items = [dict(by_team[t][i], team=t) for i, t in zip(merged, teams, strict=True)]
            # a merged slot's marginal probability is not logged (None): OPE uses A/B or single-policy logs
            ranked = Ranked(items, a.strategy, a.context, [None] * len(items), a.pool_size, "interleaving")
            served = champion
            cold_items = champion.cold_items | challenger.cold_items  # either arm may serve new items
        items, strategy, context = ranked.items, ranked.strategy, ranked.context
        cold_items = served.cold_items if cold_items is None else cold_items
        if cold_items:  # new catalogue items scored from their text (serving.catalog)
            for x in items:
                if x["item_id"] in cold_items:
                    x["cold_item"] = True
        if strategy == "sequential" and history is not None:
            strategy = "history"
        if fallback:
            strategy = "fallback"
        if explain and context:
            self._explain(served, user_id, items, context, log_types)
        if self.exposures is not None:
            self.exposures.record(
                request_id, user_id, served.version, [(x["item_id"], x["score"]) for x in items],
                variant=self.variant, context=context, policy=ranked.policy,
                experiment_id=experiment_id, arm=arm, teams=teams, propensities=ranked.propensities,
                pool_size=ranked.pool_size, masked=tuple(seen),
            )
        out = {
            "items": items,
            "model_version": served.version,
            "variant": self.variant,
            "strategy": strategy,
            "cold_start": cold_start,
            "request_id": request_id,
            "reranker": stage.describe(),
        }
        if experiment_id is not None:
            out.update(experiment_id=experiment_id, arm=arm)
        if query:
            out["query_weight"] = self.query_weight
        return out

    # ---- forgotten users (recloop/forget.py) ------------------------------------------------------
    def _forgotten(self, user_id: str) -> bool:
        """Whether the user has a tombstone (one indexed read); a hit also drops it from this process's memory."""
        if self.tombstones is None or not self.tombstones.is_forgotten(user_id):
            return False
        self.forget_memory(user_id)
        return True

    def forget_memory(self, user_id: str) -> int:
        """Drop the user from this process's lake snapshot (history, seen and suppressed sets, explanation
        verbs) and its owed online push. Returns the entries removed."""
        n = 0
        for table in (self.base_history, self.consumed, self.suppressed, self.event_types):
            if isinstance(table, dict) and table.pop(user_id, None) is not None:
                n += 1
        with self._pending_cv:
            if user_id in self._pending:
                del self._pending[user_id]
                n += 1
        return n

    def sweep_forgotten(self) -> int:
        """Drop from this process's memory every user forgotten since the last sweep, whichever worker or replica
        took the ``forget`` (the champion watcher calls it every poll). One count read when nothing changed;
        when the tombstones grew, the ids held in memory are hashed and checked in bulk (``forgotten_ids``).

        Returns:
            The users dropped. Raises what the tombstone store raises (the caller logs it and retries).
        """
        if self.tombstones is None or not hasattr(self.tombstones, "count"):
            return 0
        count = int(self.tombstones.count())
        if count == self._tombstones_swept:
            return 0
        held: set[str] = set()
        for table in (self.base_history, self.consumed, self.suppressed, self.event_types):
            if isinstance(table, dict):
                held.update(table)
        with self._pending_cv:
            held.update(self._pending)
        gone = self.tombstones.forgotten_ids(held) if held else set()
        for user_id in gone:
            self.forget_memory(user_id)
        self._tombstones_swept = count
        return len(gone)

    def memory_rows(self, user_id: str) -> int:
        """Entries this process still holds for the user (0 after ``forget_memory``)."""
        tables = (self.base_history, self.consumed, self.suppressed, self.event_types, self._pending)
        return sum(user_id in t for t in tables)

    def _forgotten_answer(self, served: ServedModel, k: int, history: list[str] | None,
                          exclude_items: Iterable[str] | None) -> dict[str, Any]:
        """``recommend`` for a forgotten user: an unknown user (popularity, or the request's own ``history``),
        nothing stored read, no exposure recorded."""
        seen = set(exclude_items or ()) | self._blocked()
        ranked = self._rank(served, list(history or []), seen, k, "")
        strategy = "history" if ranked.strategy == "sequential" else ranked.strategy
        return {"items": ranked.items, "model_version": served.version, "variant": self.variant,
                "strategy": strategy, "cold_start": True, "request_id": uuid.uuid4().hex, "reranker": None}

    def _blocked(self) -> frozenset[str]:
        """The catalogue-wide blocklist's ids (a TTL cache of the shared store; empty without one)."""
        return frozenset() if self.blocklist is None else self.blocklist.item_ids()

    def _stage(self, served: ServedModel, diversity: float | None, reranker: str | None,
               genres: Iterable[str] | None) -> RerankStage:
        """The request's re-ranking and attribute filter for ``served`` (``RerankStage``).

        Raises:
            UnknownGenreError: a genre the served catalogue does not have (the known ones are listed).
            ValueError: diversity outside [0, 1] or an unknown reranker.
        """
        d = 0.0 if diversity is None else float(diversity)
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"diversity={diversity}; expected a value in [0, 1]")
        method = reranker or self.rerank_default
        if method not in RERANKERS:
            raise ValueError(f"reranker={reranker!r}; expected one of {list(RERANKERS)}")
        boost = self.freshness_boost if served.fresh is not None else 0.0
        allowed = None
        wanted = list(genres or ())
        if wanted:
            by_name = {g.lower(): m for g, m in served.genre_masks.items()}
            unknown = [g for g in wanted if g.lower() not in by_name]
            if unknown:
                known = sorted(served.genre_masks)
                raise UnknownGenreError(f"genres: unknown {unknown}; known: {known[:50]}")
            allowed = np.logical_or.reduce([by_name[g.lower()] for g in wanted])
        active = d > 0 or boost > 0
        return RerankStage(method if active else None, d, boost, self.rerank_candidates, allowed)

    def _explain(self, served: ServedModel, user_id: str, items: list[dict[str, Any]], context: list[str],
                 log_types: Mapping[str, str] | None = None) -> None:
        """``because``/``reason`` for each item (``serving.explain``), with no read of its own: the verb is the
        event type of the user's newest positive on the history item, from the log's part read with the mask
        (``log_types``, newer) or the lake snapshot's (``self.event_types``); unknown: the default verb."""
        snapshot = self.event_types.get(user_id, {})
        newer = log_types or {}

        def types_of(ids: list[str]) -> dict[str, str]:
            return {i: newer.get(i) or snapshot[i] for i in ids if i in newer or i in snapshot}

        explain_items(items, context, served.unit_emb.numpy(), served.vocab.encode, served.titles, types_of)

    def _rank(self, served: ServedModel, hist_ids: list[str], seen: set[str] | None, k: int, user_id: str,
              exploration: ExplorationPolicy | None = None, request_id: str = "",
              stage: RerankStage | None = None, query: str | None = None) -> Ranked:
        """One model's slate after ``hist_ids`` (popularity when none is known), ``seen`` masked.

        With a ``query``, the scores are first blended with the items' text similarity to it (``_blend_query``).

        Greedy (the default): the top k (``models.ranking.top_k_items``), each slot's propensity 1. Any
        other exploration policy draws the slate with ``models.exploration.explore`` from the pool left
        after masking, with a coin stream seeded by the request id (replayable), and logs each slot's
        marginal propensity P(item at position) and the pool size.

        With an active ``stage``, items outside its genre filter are masked too, and the re-ranker reorders
        the top ``stage.n_candidates`` (``rerank_scores``): greedy returns its first k, and exploration
        draws from the re-ranked order (the candidates' score values permuted into that order, so the
        logged propensities are those of the slate actually drawn). Items carry the model's own score.

        Returns:
            ``Ranked``: response items; "sequential" (or "history" when the caller passed a request
            history, set by ``recommend``), "short_history_blend" (1-2 known items, and the served
            version's evaluation chose the blend: ``ServedModel.short_history``) or "popularity"; the known
            history ids the scores came from (the exposure's ``context``); per-slot propensities; pool size;
            the policy's text.
        """
        idx = encode_history(served.vocab, hist_ids)
        if len(idx) and served.short_history is not None and len(set(idx.tolist())) <= SHORT_HISTORY_MAX:
            nb, sims, weight = served.short_history  # the blend beat the model on short validation histories
            pop = np.where(np.isfinite(served.popularity), served.popularity, 0.0)
            scores = blend_scores(idx[None, :], nb, sims, pop, weight)[0].astype(np.float64)  # (n_items + 1,)
            strategy = "short_history_blend"
            context = [i for i in hist_ids if i in served.vocab][-served.seq_len:]
        elif len(idx):
            scores = score_history(served.model, served.seq_len, idx)
            strategy = "sequential"
            context = [i for i in hist_ids if i in served.vocab][-served.seq_len:]
        else:
            scores = served.popularity.copy()
            strategy, context = "popularity", []
            logger.info("cold start user=%s strategy=popularity", log_id(user_id))
        if query:
            scores = self._blend_query(served, scores, query)  # (n_items + 1,) sequence score + query similarity
        if seen is not None:
            scores = mask_scores(scores[None, :], seen_mask([encode_history(served.vocab, seen)], len(served.vocab)))[0]
        if stage is not None and stage.allowed is not None:
            scores = np.where(stage.allowed, scores, -np.inf)  # (n_items + 1,) the attribute filter
        model_scores, order = scores, None
        if stage is not None and stage.method is not None:
            scores, order = rerank_scores(scores, served.unit_emb, k, stage, served.fresh)
        pool = int(np.isfinite(scores).sum())
        if exploration is None or exploration.name == "greedy":
            if order is None:
                items = self._items(served, scores, k)
            else:
                items = [{"item_id": i, "score": float(model_scores[t]), "title": served.titles.get(i, i)}
                         for i, t in zip(served.vocab.decode(order[:k]), order[:k], strict=True)]
            return Ranked(items, strategy, context, [1.0] * len(items), pool, "greedy")
        # Plackett-Luce's Monte Carlo marginals are deferred to the exposure writer (off the request path)
        slate = explore(scores, k, exploration, np.random.default_rng(_request_seed(request_id)), defer=True)
        ids = served.vocab.decode(slate.items)
        items = [{"item_id": i, "score": float(model_scores[t]), "title": served.titles.get(i, i)}
                 for i, t in zip(ids, slate.items, strict=True)]
        props = slate.propensities
        return Ranked(items, strategy, context, props if isinstance(props, DeferredPropensities)
                      else [float(p) for p in props], slate.pool_size, policy_text(exploration))

    def feedback(
        self,
        user_id: str,
        item_id: str,
        event_type: str,
        value: float | None = None,
        timestamp: datetime | None = None,
        event_id: str | None = None,
        request_id: str | None = None,
        position: int | None = None,
    ) -> dict[str, Any]:
        """Store one event, then refresh the user's online sequence from the log; return after both.

        The sequence pushed online is the user's lake history (``base_history``, a snapshot taken at
        start and at each model swap) followed by the log's events stamped after that snapshot's
        newest event — so the history the model was trained on is never replaced by the feedback
        tail, and events already ingested into the lake are not counted twice.

        When the online push fails (store down, late or skipped), the stored event is still
        acknowledged with ``degraded=True``; the push is owed to the background pusher, and until it
        lands ``recommend`` rebuilds this user's history from the log. An error before the event is
        stored (contract, event-id conflict, event log down) propagates.

        ``request_id`` (and the 1-based ``position`` of the item in that answer) links the event to the
        exposure ``recommend`` answered; it is stored with the event, not part of its identity.

        Returns:
            dict with event_id, inserted (False on an idempotent replay), known_item, recent_items,
            degraded (True: stored, online refresh pending), role (the event policy's: positive,
            negative or context; a negative suppresses the item for ``policy.suppress_s``).
        """
        if self._forgotten(user_id):
            raise UserForgotten(self.tombstones.hash_of(user_id) or "")
        if timestamp is None and event_id is not None:
            # A client retry of the same event_id without a timestamp is the same event, not a conflict.
            stored = self.events.get(event_id)
            timestamp = stored["timestamp"] if stored is not None else None
        ts = timestamp or datetime.now(UTC)
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        event = {
            "event_id": event_id or uuid.uuid4().hex,
            "user_id": user_id,
            "item_id": item_id,
            "event_type": event_type,
            "value": value,
            "timestamp": ts.astimezone(UTC),
            "source": self.source,
        }
        if request_id is not None:
            event["request_id"] = request_id
        if position is not None:
            event["position"] = position
        base_items, base_ts = self.base_history.get(user_id, ([], None))
        base_items = list(base_items)
        degraded = False
        with self._lock(user_id):
            if getattr(self.events, "supports_locked_push", False):
                # push while the log holds the user's write lock: pushes are ordered across processes
                pushed: list[BaseException] = []

                def push(tail: list[str]) -> None:
                    try:
                        self.online.push_recent_items(user_id, (base_items + list(tail))[-self.max_seq_len:],
                                                      datetime.now(UTC))
                    except Exception as err:  # noqa: BLE001 - never roll the event back: acknowledge, push later
                        pushed.append(err)

                inserted, tail = self.events.append_and_recent(event, self.max_seq_len, after_ts=base_ts,
                                                               while_locked=push)
                recent = (base_items + list(tail))[-self.max_seq_len:]
                failure = pushed[0] if pushed else None
            else:
                inserted, tail = self.events.append_and_recent(event, self.max_seq_len, after_ts=base_ts)
                try:
                    recent = self._refresh(user_id, base_items, base_ts, list(tail))
                    failure = None
                except Exception as err:  # noqa: BLE001 - the event is stored: acknowledge it, push later
                    recent, failure = (base_items + list(tail))[-self.max_seq_len:], err
            if failure is not None:
                degraded = True
                self._owe_push(user_id)
                logger.info("online refresh failed; push queued user=%s error=%s", log_id(user_id), failure)
            else:
                with self._pending_cv:  # the pushed list is the log's latest: nothing owed any more
                    self._pending.pop(user_id, None)
        return {
            "event_id": event["event_id"],
            "inserted": bool(inserted),
            "known_item": item_id in self.current_served().vocab,
            "recent_items": len(recent),
            "degraded": degraded,
            "role": event_role(event_type, value, self.policy),
        }

    def _refresh(self, user_id: str, base: list[str], base_ts: datetime | None, tail: list[str]) -> list[str]:
        """Push ``base + tail`` (last ``max_seq_len``) and re-read the log until the pushed tail is current."""
        n = self.max_seq_len
        for _ in range(MAX_REFRESH_ROUNDS):
            self.online.push_recent_items(user_id, (base + tail)[-n:], datetime.now(UTC))
            latest = list(self.events.recent_items(user_id, n, after_ts=base_ts))
            if latest == tail:
                return (base + tail)[-n:]
            tail = latest
        self.online.push_recent_items(user_id, (base + tail)[-n:], datetime.now(UTC))
        return (base + tail)[-n:]

    # ---- online-store outages: owed pushes, emptiness, re-sync --------------------------------
    @property
    def pending_pushes(self) -> int:
        """Users whose online sequence is behind the log (a push failed and is being retried)."""
        return len(self._pending)

    def _owe_push(self, user_id: str) -> None:
        with self._pending_cv:
            self._pending.setdefault(user_id, None)
            self._pending_cv.notify()
        self._start_worker()

    def _push_owed(self, user_id: str) -> bool:
        """Push one owed user, derived from the log under its lock (so pushes stay ordered)."""
        if self._forgotten(user_id):  # nothing to push: the user's rows are being deleted
            return True
        base, base_ts = self.base_history.get(user_id, ([], None))
        with self._lock(user_id):
            try:
                if getattr(self.events, "supports_locked_push", False):
                    self.events.recent_locked(
                        user_id, self.max_seq_len, after_ts=base_ts,
                        while_locked=lambda tail: self.online.push_recent_items(
                            user_id, (list(base) + list(tail))[-self.max_seq_len:], datetime.now(UTC)))
                else:
                    tail = list(self.events.recent_items(user_id, self.max_seq_len, after_ts=base_ts))
                    self._refresh(user_id, list(base), base_ts, tail)
            except Exception as err:  # noqa: BLE001 - still down: retried after a pause
                logger.debug("owed push failed user=%s error=%s", log_id(user_id), err)
                return False
            with self._pending_cv:
                self._pending.pop(user_id, None)
        return True

    def _start_worker(self) -> None:
        with self._pending_cv:
            if self._sync_thread is not None and self._sync_thread.is_alive():
                return
            self._sync_stop.clear()
            self._sync_thread = threading.Thread(target=self._sync_loop, name="online-sync", daemon=True)
            self._sync_thread.start()

    def _sync_loop(self) -> None:
        """Drain owed pushes (pausing ``push_retry_s`` after a failure); every ``check_interval_s``,
        and right after a backlog drained, re-sync the store if it is empty."""
        next_check = time.monotonic() + self._check_interval_s
        while not self._sync_stop.is_set():
            with self._pending_cv:
                if not self._pending and not self._sync_stop.is_set():  # checked under the lock: no lost stop
                    wait = max(0.0, next_check - time.monotonic()) if self._check_empty else None
                    self._pending_cv.wait(wait)
                user = next(iter(self._pending), None)
            if self._sync_stop.is_set():
                break
            if user is not None:
                if not self._push_owed(user):
                    self._sync_stop.wait(self.push_retry_s)
                elif not self._pending:
                    next_check = 0.0  # a backlog just drained: the store came back, maybe empty
                continue
            if self._check_empty and time.monotonic() >= next_check:
                self.resync_if_empty()
                next_check = time.monotonic() + self._check_interval_s

    def start_online_sync(self, check_interval_s: float = 10.0, *, resync_now: bool = True) -> dict[str, Any] | None:
        """Re-sync an empty store now (start-up), then keep a daemon thread that retries owed pushes
        and re-syncs the store whenever it is found empty (every ``check_interval_s``).

        Returns:
            The start-up re-sync's report, or None when none ran.
        """
        self._check_interval_s = check_interval_s
        self._check_empty = True
        report = self.resync_if_empty() if resync_now else None
        self._start_worker()
        with self._pending_cv:  # a worker started lazily by a failed push: check from now on
            self._pending_cv.notify_all()
        return report

    def stop_online_sync(self, timeout_s: float = 5.0) -> None:
        """Stop the background thread (owed pushes stay owed)."""
        self._sync_stop.set()
        with self._pending_cv:
            self._pending_cv.notify_all()
        if self._sync_thread is not None:
            self._sync_thread.join(timeout_s)

    def _has_row(self, user_id: str) -> bool:
        has_row = getattr(self.online, "has_row", None)
        return bool(has_row(user_id)) if has_row is not None else self.online.recent_items(user_id) is not None

    def online_store_empty(self) -> bool:
        """True when the store lost its rows: the re-sync's sentinel is missing, or none of a few
        lake users (``base_history``) has a row. Raises when the store cannot be read."""
        if not self._has_row(SENTINEL_USER):
            return True
        probes = [u for _, u in zip(range(N_EMPTY_PROBES), self.base_history, strict=False)]
        return bool(probes) and not any(self._has_row(u) for u in probes)

    def resync_if_empty(self) -> dict[str, Any] | None:
        """Re-sync the online store if it is reachable and empty; returns the report, else None."""
        try:
            if not self.online_store_empty():
                return None
        except Exception as err:  # noqa: BLE001 - unreachable: checked again later
            logger.info("online store not checked for emptiness: %s", err)
            return None
        logger.warning("online store is empty: re-syncing it from the lake snapshot and the event log")
        try:
            return self.resync_online()
        except Exception as err:  # noqa: BLE001 - the next check retries
            logger.error("online re-sync failed: %s", err)
            return None

    def resync_online(self) -> dict[str, Any]:
        """``resync_online`` over this core's stores and lake snapshot (one at a time per process)."""
        with self._resync_lock:
            self.resyncing = True
            try:
                base = self.base_history
                if self.tombstones is not None:  # never restore a forgotten user from a stale lake snapshot
                    gone = self.tombstones.forgotten_ids(list(base))
                    base = {u: v for u, v in base.items() if u not in gone}
                report = resync_online(self.online, self.events, base, self.max_seq_len)
            finally:
                self.resyncing = False
            self.last_resync = report
        return report

    def online_status(self) -> dict[str, Any]:
        """The online store as serving sees it (for ``/ready``; a few reads, none while the circuit is open).

        Returns:
            dict: reachable (a probe read answered), empty (it lost its rows: re-sync pending),
            stale (some users' rows are behind the log: pushes owed or a re-sync running),
            pending_pushes, circuit_open (the store is skipped after a failure), resyncing,
            last_resync (report or None), last_error (when not reachable).
        """
        reachable = empty = False
        error: str | None = None
        if not getattr(self.online, "circuit_open", False):
            try:
                empty = self.online_store_empty()
                reachable = True
            except Exception as err:  # noqa: BLE001 - reported, not raised
                error = f"{type(err).__name__}: {err}"[:500]
        if not reachable and error is None:
            error = getattr(self.online, "last_error", None)
        pending = self.pending_pushes
        return {
            "reachable": reachable,
            "empty": empty,
            "stale": pending > 0 or self.resyncing,
            "pending_pushes": pending,
            "circuit_open": bool(getattr(self.online, "circuit_open", False)),
            "resyncing": self.resyncing,
            "last_resync": self.last_resync,
            "last_error": None if reachable else error,
        }

    def similar_items(self, item_id: str, k: int = 10) -> dict[str, Any]:
        """The k items closest to ``item_id`` by cosine similarity of the model's item embeddings.

        Raises:
            UnknownItemError: ``item_id`` is not in the served model's vocabulary.
        """
        served = self.current_served()
        if item_id not in served.vocab:
            raise UnknownItemError(
                f"item_id={item_id!r} is not in the served model's vocabulary (version {served.version})"
            )
        idx = int(served.vocab.encode([item_id])[0])
        sims = (served.unit_emb @ served.unit_emb[idx]).numpy().copy()  # (n_items + 1,)
        sims[[PAD_IDX, idx]] = -np.inf
        return {"items": self._items(served, sims, k), "model_version": served.version}

    def ping_stores(self) -> tuple[bool, bool]:
        """(event log reachable, online store reachable), probing with a read of a dummy user."""
        probe = "__recloop_ready_probe__"
        ok_log = ok_online = True
        try:
            self.events.recent_items(probe, 1)
        except Exception as err:  # noqa: BLE001 - readiness reports any store failure
            logger.warning("event log not reachable: %s", err)
            ok_log = False
        try:
            self.online.recent_items(probe)
        except Exception as err:  # noqa: BLE001
            logger.warning("online store not reachable: %s", err)
            ok_online = False
        return ok_log, ok_online


def _push_rows(online: Any, rows: Mapping[str, tuple[list[str], datetime | None]]) -> None:
    """Write ``rows`` (user -> (items, event time or None for now)), in bulk when the store can."""
    if not rows:
        return
    now = datetime.now(UTC)
    stamps = {u: ts or now for u, (_, ts) in rows.items()}
    push_many = getattr(online, "push_many", None)
    if push_many is not None:
        push_many({u: items for u, (items, _) in rows.items()}, stamps)
        return
    for user_id, (items, _) in rows.items():
        online.push_recent_items(user_id, items, stamps[user_id])


def _aware(ts: Any) -> datetime | None:
    """``ts`` as a tz-aware UTC datetime (naive is taken as UTC); None stays None."""
    if ts is None:
        return None
    ts = ts.to_pydatetime() if hasattr(ts, "to_pydatetime") else ts
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _log_users(events: Any) -> list[str]:
    """Distinct users of the event log (``EventLog.users``; a full read of a log without it)."""
    if hasattr(events, "users"):
        return list(events.users())
    if not hasattr(events, "since"):
        return []
    return sorted(events.since()["user_id"].astype(str).unique())


def _log_rows_after(events: Any, seq: int) -> list[tuple[int, str]]:
    """(seq, user_id) of the log rows with ``seq > seq`` ([] when the log cannot page by seq)."""
    if not hasattr(events, "since"):
        return []
    frame = events.since(after_seq=seq, with_seq=True)
    return list(zip(frame["seq"].astype(int), frame["user_id"].astype(str), strict=True))


def resync_online(
    online: Any,
    events: Any,
    base_history: BaseHistory,
    max_seq_len: int,
    *,
    max_rounds: int = MAX_REFRESH_ROUNDS,
) -> dict[str, Any]:
    """Rewrite the online sequence of every user in the lake snapshot or the log from its sources.

    Each user's list is what ``feedback`` pushes: ``base_history`` followed by the log's events
    stamped after it, the last ``max_seq_len``. A list with log events is stamped now (as
    ``feedback`` stamps its pushes); a lake-only list keeps the lake's time, so the read freshness
    limit (``settings.online_freshness_s``) still hides old users. Events logged while it runs (by this
    or another process) are caught as ``_refresh`` does: after the push the log is re-read (rows
    past the mark, with an overlap for PostgreSQL's late commits) and those users pushed again, so a
    concurrent feedback's newer list is never overwritten by an older one. Last, the sentinel row is
    written: a store that lacks it later has lost its rows (``RecommenderCore.online_store_empty``).
    Only ``user_recent_items`` is restored (what serving reads); the other views come back with the
    next materialisation (the features flow).

    Args:
        online: ``featurestore.online.OnlineFeatures`` (bulk ``push_many``) or any store with
            ``push_recent_items``.
        events: ``recloop.eventlog.EventLog`` (``recent_items``, ``since``, ``max_seq``).
    Returns:
        dict: users (rewritten), log_users, pushed (rows, with re-pushes), rounds, seconds, at.
    Raises:
        OnlineStoreUnavailable (or the store's error): a push failed; rows already pushed stay.
    """
    t0 = time.perf_counter()
    max_seq = events.max_seq() if hasattr(events, "max_seq") else None
    low = max(0, (max_seq or 0) - LOG_SEQ_OVERLAP)
    seen = {seq for seq, _ in _log_rows_after(events, low)}  # every row here is in the lists below
    log_users = _log_users(events)
    in_log = set(log_users)

    def derive(users: Iterable[str]) -> dict[str, tuple[list[str], datetime | None]]:
        rows = {}
        for user_id in users:
            base, base_ts = base_history.get(user_id, ([], None))
            tail = list(events.recent_items(user_id, max_seq_len, after_ts=base_ts)) if user_id in in_log else []
            rows[user_id] = ((list(base) + tail)[-max_seq_len:], None if tail else _aware(base_ts))
        return rows

    users = list(dict.fromkeys([*base_history, *log_users]))
    rows = derive(users)
    _push_rows(online, rows)
    pushed, rounds = len(rows), 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007 - reported
        new = [(seq, u) for seq, u in _log_rows_after(events, low) if seq not in seen]
        if not new:
            break
        seen.update(seq for seq, _ in new)
        late = list(dict.fromkeys(u for _, u in new))
        in_log.update(late)
        rows = derive(late)
        _push_rows(online, rows)
        pushed += len(rows)
    _push_rows(online, {SENTINEL_USER: ([], None)})
    report = {
        "users": len(users),
        "log_users": len(in_log),
        "pushed": pushed,
        "rounds": rounds,
        "seconds": round(time.perf_counter() - t0, 3),
        "at": datetime.now(UTC).isoformat(),
    }
    logger.info("online store re-synced %s", report)
    return report
