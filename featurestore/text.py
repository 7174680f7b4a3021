"""Item and query text embeddings for text-aware models: the packaged sentence encoder behind the embedding cache.

The same encoder and the same item text as the ``item_content`` view (``recloop.features.item_text``:
title, genres and free text; all-MiniLM-L6-v2, L2-normalised, 384 floats) embed the catalogue for training
(the train flow), new items at serving time and recommend queries. Item texts go through the disk cache
(``featurestore.embedding_cache``: each text once per model); queries through an in-memory LRU
(``QueryEncoder``), since a per-query disk cache would cost more than the cache hit saves.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop import features as F

logger = logging.getLogger(__name__)

#: The encoder's name as recorded with a text-aware model (its checkpoint's ``extra["text_encoder"]``).
ENCODER_NAME = "all-MiniLM-L6-v2"
D_TEXT = 384


def embedding_cache_path(home: Path) -> Path:
    """The features stage's embedding cache under ``home`` (shared by training and serving)."""
    return home / "features" / "embedding_cache.parquet"


def item_text_embeddings(items: pd.DataFrame, encoder: F.TextEncoder, batch_size: int = 256
                         ) -> dict[str, np.ndarray]:
    """item_id -> (d_text,) float32 L2-normalised embedding of the item's text (``recloop.features.item_text``).

    Args:
        items: contract ``items`` frame (item_id, title, genres, text); a later row of an id wins.
        encoder: e.g. ``featurestore.materialize.load_text_encoder(cache_path=...)``.
    Returns:
        One entry per distinct item id (empty for an empty frame).
    """
    if not len(items):
        return {}
    items = items.drop_duplicates("item_id", keep="last")
    texts = F.item_text(items)
    emb = np.asarray(encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True), dtype=np.float32)
    return dict(zip(items["item_id"].astype(str), emb, strict=True))


class QueryEncoder:
    """Embeds recommend queries: the sentence encoder (loaded on the first query) behind an LRU cache.

    Thread-safe. A repeated query costs a dictionary lookup; a new one an encoder forward pass (measured by
    ``bench/text_cost.py``). Returns L2-normalised (d_text,) float32 vectors.

    Args:
        load: builds the encoder (``featurestore.materialize.load_text_encoder``), called once.
        max_size: queries kept (0 disables the cache).
    """

    def __init__(self, load: Callable[[], Any], max_size: int = 1024) -> None:
        self._load, self._encoder = load, None
        self.max_size = max_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def encoder(self) -> Any:
        """The loaded encoder (loads it on the first call)."""
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load()
            return self._encoder

    def encode(self, query: str) -> np.ndarray:
        """(d_text,) float32 embedding of ``query`` (whitespace-normalised key)."""
        key = " ".join(query.split())
        with self._lock:
            vec = self._cache.get(key)
            if vec is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return vec
        vec = np.asarray(self.encoder().encode([key], normalize_embeddings=True), dtype=np.float32)[0]
        with self._lock:
            self.misses += 1
            if self.max_size > 0:
                self._cache[key] = vec
                self._cache.move_to_end(key)
                while len(self._cache) > self.max_size:
                    self._cache.popitem(last=False)
        return vec
