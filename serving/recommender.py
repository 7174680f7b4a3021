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
for one user are serialised in this process (striped locks), and after each push the log is re-read
and pushed again until unchanged, so a stale push from another worker can never be the final state.
"""

from __future__ import annotations

import logging
import threading
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import torch

from models.ranking import encode_history, score_histories, top_k_items
from models.vocab import PAD_IDX, ItemVocabulary

logger = logging.getLogger(__name__)

N_LOCK_STRIPES = 256
MAX_REFRESH_ROUNDS = 5


class OnlineStore(Protocol):
    def recent_items(self, user_id: str) -> list[str] | None: ...

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> None: ...


class EventStore(Protocol):
    def append_and_recent(
        self, event: dict[str, Any], n: int, after_ts: datetime | None = None
    ) -> tuple[bool, list[str]]: ...

    def recent_items(self, user_id: str, n: int, after_ts: datetime | None = None) -> list[str]: ...

    def get(self, event_id: str) -> dict[str, Any] | None: ...


#: user_id -> (last items in the lake, oldest first; timestamp of the user's newest lake event)
BaseHistory = Mapping[str, tuple[list[str], datetime]]


class UnknownItemError(KeyError):
    """An item id the served model does not know (``similar_items``)."""


@dataclass(frozen=True)
class ServedModel:
    """Everything one model version needs to answer requests; swapped in as one reference.

    Attributes:
        model: torch module in eval mode with ``score(item_idx) -> (batch, n_items + 1)``.
        vocab: its ``ItemVocabulary``.
        version: registered model version (str).
        seq_len: history length the model takes (left-padded with 0).
        unit_emb: (n_items + 1, d_model) L2-normalised item embeddings (row 0 zero).
        popularity: (n_items + 1,) cold-start scores, column 0 = -inf.
        titles: item_id -> title (may be partial).
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
) -> ServedModel:
    """Prepare a loaded model for serving and smoke-score it (raises if it cannot answer).

    Cold-start popularity: ``popularity`` ({item_id: count}, e.g. from the lake), else
    ``extra["item_popularity"]`` when the checkpoint carries it, else the L2 norm of each item's
    embedding (with tied output embeddings, frequent items get larger norms).

    Raises:
        ValueError: the model's score width does not match the vocabulary, or scores are not finite.
    """
    extra = extra or {}
    if hasattr(model, "eval"):
        model.eval()
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
    titles = titles if titles is not None else dict(extra.get("titles") or {})
    return ServedModel(model, vocab, str(version), run_id, seq_len, unit, pop, titles)


class RecommenderCore:
    """recommend / feedback / similar_items over the current ``ServedModel`` (thread-safe)."""

    def __init__(
        self,
        served: ServedModel,
        online: OnlineStore,
        events: EventStore,
        *,
        max_seq_len: int = 50,
        variant: str = "champion",
        source: str = "api",
        base_history: BaseHistory | None = None,
    ) -> None:
        self._served = served
        self.base_history: BaseHistory = base_history or {}
        self.online = online
        self.events = events
        self.max_seq_len = max_seq_len
        self.variant = variant
        self.source = source
        self._locks = [threading.Lock() for _ in range(N_LOCK_STRIPES)]

    @property
    def served(self) -> ServedModel:
        return self._served

    def swap(self, served: ServedModel) -> None:
        """Serve ``served`` from now on (one reference assignment; in-flight requests keep the old one)."""
        old = self._served.version
        self._served = served
        logger.info("model swapped old_version=%s new_version=%s", old, served.version)

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

    def recommend(
        self, user_id: str, k: int = 10, exclude_seen: bool = True, history: list[str] | None = None
    ) -> dict[str, Any]:
        """Top-k items for a user.

        History: the request's ``history`` if given, else the online store's recent items. A user
        without stored history is a cold start: the model on the given history if it has known
        items, else popularity.

        Returns:
            dict with items [{item_id, score, title}], model_version, variant, strategy, cold_start.
        """
        served = self._served  # one read: a concurrent swap does not mix versions
        stored = self.online.recent_items(user_id)
        cold_start = not stored
        hist_ids = history if history is not None else (stored or [])
        idx = encode_history(served.vocab, hist_ids)
        if len(idx):
            scores = score_history(served.model, served.seq_len, idx)
            strategy = "history" if history is not None else "sequential"
        else:
            scores = served.popularity.copy()
            strategy = "popularity"
            logger.info("cold start user_id=%s strategy=popularity", user_id[:64])
        if exclude_seen and len(idx):
            scores[idx] = -np.inf
        return {
            "items": self._items(served, scores, k),
            "model_version": served.version,
            "variant": self.variant,
            "strategy": strategy,
            "cold_start": cold_start,
        }

    def feedback(
        self,
        user_id: str,
        item_id: str,
        event_type: str,
        value: float | None = None,
        timestamp: datetime | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """Store one event, then refresh the user's online sequence from the log; return after both.

        The sequence pushed online is the user's lake history (``base_history``, a snapshot taken at
        start and at each model swap) followed by the log's events stamped after that snapshot's
        newest event — so the history the model was trained on is never replaced by the feedback
        tail, and events already ingested into the lake are not counted twice.

        Returns:
            dict with event_id, inserted (False on an idempotent replay), known_item, recent_items.
        """
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
        base_items, base_ts = self.base_history.get(user_id, ([], None))
        with self._lock(user_id):
            inserted, tail = self.events.append_and_recent(event, self.max_seq_len, after_ts=base_ts)
            recent = self._refresh(user_id, base_items, base_ts, list(tail))
        return {
            "event_id": event["event_id"],
            "inserted": bool(inserted),
            "known_item": item_id in self._served.vocab,
            "recent_items": len(recent),
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

    def similar_items(self, item_id: str, k: int = 10) -> dict[str, Any]:
        """The k items closest to ``item_id`` by cosine similarity of the model's item embeddings.

        Raises:
            UnknownItemError: ``item_id`` is not in the served model's vocabulary.
        """
        served = self._served
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
