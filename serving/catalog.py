"""New items served at once and text queries: the serving side of text-aware models.

``TextCatalog`` (one per worker, held by ``RecommenderCore.text``) turns the served model into the model a
request sees:

- **New items.** The catalogue of items added after the lake snapshot (``recloop.catalog``, shared by every
  worker through the event-log database, behind a TTL cache) is appended to a text-aware model's items: each
  new item's text is embedded with the packaged encoder (through the embedding cache) and projected by the
  model's own ``text_proj`` (``models.text_items.cold_vectors``), so it is scored like any item, masked,
  re-ranked and explored like any item, and flagged ``cold_item`` in the answer. The result is cached per
  (served model, catalogue version): a request pays nothing until the catalogue or the model changes. An
  ID-only model cannot score an item it has no embedding for: it serves the catalogue it was trained on, and
  ``status`` says why new items wait for the next retrain (the loop's train flow adds them to the vocabulary).
- **Queries.** ``query_sims`` is the cosine of each served item's text embedding with the query's
  (``featurestore.text.QueryEncoder``: LRU-cached); ``RecommenderCore`` blends it with the sequence score
  (``models.text_items.blend_query``, weight ``settings.query_weight``). Item texts: the model's own text buffer
  for a text-aware model, else the lake catalogue's texts embedded once per model version (cached).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.text_items import ItemTable, cold_vectors, l2_normalise, text_matrix
from models.vocab import ItemVocabulary
from recloop.catalog import items_frame

logger = logging.getLogger(__name__)

#: Why an ID-only served model does not serve new items (``status``, ``POST /items``).
ID_ONLY_REASON = ("the served model is ID-only (item_repr='id'): new items are recommended after the next "
                  "retrain gives them ID embeddings")


def serves_new_items(model: Any) -> bool:
    """True when ``model`` (a served model or its ``ItemTable``) scores items from their text."""
    inner = getattr(model, "model", model)
    return bool(getattr(inner, "uses_text", False))


def _inner(model: Any) -> Any:
    return model.model if isinstance(model, ItemTable) else model


class TextCatalog:
    """New catalogue items and query similarity for one serving worker (see the module docstring).

    Args:
        catalog: ``recloop.catalog.CachedCatalog`` (``rows() -> (rows, version)``), or None for none.
        item_encoder: loads the item-text encoder (``featurestore.materialize.load_text_encoder`` with the
            embedding cache); called on the first new item or query.
        query_encoder: ``featurestore.text.QueryEncoder``, or None (queries unsupported).
        lake_items: the lake's contract ``items`` frame (texts of the trained catalogue, for queries against
            an ID-only model), or None.
    """

    def __init__(self, catalog: Any, item_encoder: Any, query_encoder: Any = None,
                 lake_items: pd.DataFrame | None = None) -> None:
        self.catalog = catalog
        self._load_item_encoder, self._item_encoder = item_encoder, None
        self.query_encoder = query_encoder
        self.lake_items = lake_items
        self._lock = threading.Lock()
        # per base served model (the champion and, during an experiment, the challenger: at most MAX_SERVED kept):
        # id(served) -> (served, catalogue version, extended)
        self._extended: dict[int, tuple[Any, str, Any]] = {}
        self._texts: dict[str, np.ndarray] = {}  # item_id -> text embedding, new items and lake items (per worker)
        # id(served) -> (a served model, its (n_rows, d_text) L2-normalised texts as a tensor)
        self._text_units: dict[int, tuple[Any, torch.Tensor]] = {}
        # (id(served), normalised query) -> (served, (n_rows,) similarities): a repeated query costs a lookup
        self._sims: OrderedDict[tuple[int, str], tuple[Any, np.ndarray]] = OrderedDict()
        self.last_error: str | None = None

    def _encoder(self) -> Any:
        if self._item_encoder is None:
            self._item_encoder = self._load_item_encoder()
        return self._item_encoder

    def _embed(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Text embeddings of the frame's items not embedded yet (through the cached encoder)."""
        from featurestore.text import item_text_embeddings

        todo = frame[~frame["item_id"].astype(str).isin(self._texts.keys())]
        if len(todo):
            self._texts.update(item_text_embeddings(todo, self._encoder()))
        return self._texts

    def current(self, served: Any) -> Any:
        """``served`` with the catalogue's new items appended when the model is text-aware (cached per served
        model and catalogue version), else ``served`` itself. A failure keeps the last good extension (or
        ``served``) and is kept in ``last_error``."""
        if self.catalog is None or not serves_new_items(served.model):
            return served
        rows, version = self.catalog.rows()
        cached = self._extended.get(id(served))
        if cached is not None and cached[0] is served and cached[1] == version:
            return cached[2]
        with self._lock:
            cached = self._extended.get(id(served))
            if cached is not None and cached[0] is served and cached[1] == version:
                return cached[2]
            try:
                out = self._extend(served, rows)
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - the catalogue must never stop recommend
                self.last_error = f"new items not served: {type(err).__name__}: {err}"[:300]
                logger.error(self.last_error)
                return cached[2] if cached is not None and cached[0] is served else served
            _put(self._extended, served, (served, version, out))
            return out

    def _extend(self, served: Any, rows: Any) -> Any:
        """A new ``ServedModel``: the new items (not in the vocabulary) appended to every per-item array."""
        model = _inner(served.model)
        new_rows = [r for r in rows if r["item_id"] not in served.vocab]
        if not new_rows:
            return replace(served, model=ItemTable(model))
        frame = items_frame(new_rows)
        texts = self._embed(frame)
        ids = [r["item_id"] for r in new_rows]
        d_text = int(model.config.d_text)
        text = text_matrix(ids, texts, d_text)[1:]  # (n_new, d_text)
        table = ItemTable(model, cold_vectors(model, text))  # (n_items + 1 + n_new, d_model)
        n_old, n_new = len(served.vocab) + 1, len(ids)
        vocab = ItemVocabulary(list(served.vocab.ids) + ids)
        unit = torch.nn.functional.normalize(table.item_embeddings().detach().float(), dim=1)
        unit[0] = 0.0
        pop = np.concatenate([served.popularity, np.zeros(n_new, dtype=served.popularity.dtype)])
        genre_masks = {g: np.concatenate([m, np.zeros(n_new, dtype=bool)]) for g, m in served.genre_masks.items()}
        for j, r in enumerate(new_rows):
            for g in r["genres"]:
                genre_masks.setdefault(g, np.zeros(n_old + n_new, dtype=bool))[n_old + j] = True
        fresh = None if served.fresh is None else np.concatenate([served.fresh, np.ones(n_new, dtype=bool)])
        short = served.short_history
        if short is not None:
            nb, sims, weight = short
            short = (np.concatenate([nb, np.zeros((n_new, nb.shape[1]), dtype=nb.dtype)]),
                     np.concatenate([sims, np.zeros((n_new, sims.shape[1]), dtype=sims.dtype)]), weight)
        titles = {**served.titles, **{r["item_id"]: r["title"] for r in new_rows}}
        logger.info("new items appended version=%s n_new=%d", served.version, n_new)
        return replace(served, model=table, vocab=vocab, unit_emb=unit, popularity=pop, titles=titles,
                       genre_masks=genre_masks, fresh=fresh, short_history=short, cold_items=frozenset(ids))

    def status(self, served: Any) -> dict[str, Any]:
        """For ``/model_info`` and ``POST /items``: whether the served model serves new items, how many it serves
        now, and why not (``reason``)."""
        ext = self.current(served)
        supported = serves_new_items(served.model)
        cfg = getattr(_inner(served.model), "config", None)
        return {"item_repr": getattr(cfg, "item_repr", "id"), "serves_new_items": supported,
                "new_items_served": len(getattr(ext, "cold_items", ())),
                "reason": None if supported else ID_ONLY_REASON, "last_error": self.last_error}

    def query_sims(self, served: Any, query: str) -> np.ndarray:
        """(n_rows,) cosine of each served item's text embedding with ``query``'s (0 for an item without text).

        Kept per (served model, whitespace-normalised query), at most ``SIMS_CACHE``: a repeated query costs a
        lookup (read-only array); a new one, the encoder (``QueryEncoder``'s own cache) and one matrix-vector product.

        Raises:
            ValueError: no query encoder.
        """
        if self.query_encoder is None:
            raise ValueError("this service has no query encoder")
        key = (id(served), " ".join(query.split()))
        with self._lock:
            hit = self._sims.get(key)
            if hit is not None and hit[0] is served:
                self._sims.move_to_end(key)
                return hit[1]
        q = self.query_encoder.encode(query)  # (d_text,)
        # torch's matrix-vector product on the service's one thread (numpy's BLAS threads measured 45 ms p50 here
        # under CPU contention, against ~0.1 ms); the result is kept, so a repeated query skips it (it read the
        # (n_rows, d_text) matrix: 2.6 MB at 1,682 items, 2-10 ms p50 on this shared machine)
        sims = self._text_unit(served).mv(torch.from_numpy(q)).numpy()  # (n_rows,)
        sims.flags.writeable = False
        with self._lock:
            self._sims[key] = (served, sims)
            self._sims.move_to_end(key)
            while len(self._sims) > SIMS_CACHE:
                self._sims.popitem(last=False)
        return sims

    def _text_unit(self, served: Any) -> torch.Tensor:
        """(n_rows, d_text) L2-normalised item texts of ``served``'s rows, computed once per served model."""
        cached = self._text_units.get(id(served))
        if cached is not None and cached[0] is served:
            return cached[1]
        with self._lock:
            model = _inner(served.model)
            n_rows = len(served.vocab) + 1
            if serves_new_items(model):
                base = model.item_text.detach().cpu().numpy()  # (n_items + 1, d_text), the trained catalogue
                extra = [i for i in served.vocab.ids[base.shape[0] - 1:]]
                texts = self._texts if not extra else self._embed(self._cold_frame(extra))
                unit = np.concatenate([base, text_matrix(extra, texts, base.shape[1])[1:]])
            else:
                frame = self.lake_items if self.lake_items is not None else pd.DataFrame(
                    columns=["item_id", "title", "genres", "text"])
                frame = frame[frame["item_id"].astype(str).isin(set(served.vocab.ids))]
                texts = self._embed(frame) if len(frame) else {}
                d_text = next((len(v) for v in texts.values()), 1)
                unit = text_matrix(served.vocab.ids, texts, d_text)
            unit = l2_normalise(unit)
            if unit.shape[0] != n_rows:
                raise ValueError(f"text rows {unit.shape[0]} do not match the served items {n_rows}")
            out = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
            _put(self._text_units, served, (served, out))
            return out

    def _cold_frame(self, ids: list[str]) -> pd.DataFrame:
        rows, _ = self.catalog.rows() if self.catalog is not None else ((), "")
        wanted = set(ids)
        return items_frame([r for r in rows if r["item_id"] in wanted])


#: Query similarity vectors a ``TextCatalog`` keeps ((n_rows,) float32 each: 40 kB at 10,000 items).
SIMS_CACHE = 256
#: Served models a ``TextCatalog`` keeps derived state for (the champion, an experiment's two arms, one being swapped).
MAX_SERVED = 4


def _put(cache: dict[int, Any], served: Any, value: Any) -> None:
    """Keep ``value`` for ``served`` (by identity), dropping the oldest entries beyond ``MAX_SERVED``."""
    cache.pop(id(served), None)
    cache[id(served)] = value
    while len(cache) > MAX_SERVED:
        cache.pop(next(iter(cache)))


def add_item(core: Any, item: dict[str, Any]) -> dict[str, Any]:
    """``POST /items``: store a new catalogue item and say whether the served model recommends it now.

    The row goes to the shared ``catalog_items`` table (``recloop.catalog.CatalogStore.add``); this worker's
    cache is invalidated, so its next request serves the item (other workers within ``catalog_ttl_s``).

    Args:
        core: a ``serving.recommender.RecommenderCore`` with ``text`` (a ``TextCatalog``).
        item: ``{item_id, title, genres?, text?}``.
    Returns:
        ``{item_id, inserted, known_item, served_now, reason, n_catalogue}`` (``ItemResponse``).
    Raises:
        ValueError: a bad item (``recloop.catalog.validate_item``) or no catalogue store.
    """
    from recloop.catalog import validate_item

    text = getattr(core, "text", None)
    if text is None or text.catalog is None:
        raise ValueError("this service has no catalogue store")
    row = validate_item(item)
    store = text.catalog.store
    inserted = bool(store.add([row]))
    text.catalog.invalidate()
    base = core.served
    known = row["item_id"] in base.vocab
    served = core.current_served()
    served_now = row["item_id"] in served.vocab
    reason = None
    if not served_now:
        reason = text.last_error or ID_ONLY_REASON
    rows, _ = text.catalog.rows()
    return {"item_id": row["item_id"], "inserted": inserted, "known_item": known, "served_now": served_now,
            "reason": reason, "n_catalogue": len(rows)}
