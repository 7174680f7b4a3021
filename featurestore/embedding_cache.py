"""A disk cache in front of the sentence encoder: each item text is embedded once per model.

The features stage embeds the whole catalogue on every run; with the cache only new or changed
texts go through the encoder, and the encoder itself is loaded only when something is missing
(the continuous loop's features refresh then costs no model load at all).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop.features import TextEncoder

logger = logging.getLogger(__name__)


class CachedEncoder:
    """``TextEncoder`` that reads/writes embeddings by sha1(model name, encode kwargs, text) in a Parquet file.

    Args:
        load: builds the real encoder (called at most once, on the first cache miss).
        cache_path: Parquet file with columns ``key`` (str) and ``embedding`` (list[float32]).
        model_name: identifies the encoder in the key, so another model never reads these vectors.
    """

    def __init__(self, load: Callable[[], TextEncoder], cache_path: Path, model_name: str) -> None:
        self._load, self._encoder = load, None
        self.cache_path, self.model_name = cache_path, model_name
        self.hits = self.misses = 0

    def _key(self, text: str, kwargs: dict[str, Any]) -> str:
        opts = ",".join(f"{k}={kwargs[k]}" for k in sorted(kwargs) if k != "batch_size")
        return hashlib.sha1(f"{self.model_name}\x1f{opts}\x1f{text}".encode()).hexdigest()

    def encode(self, sentences: list[str], **kwargs: Any) -> np.ndarray:
        """Embeddings of ``sentences``, (n_texts, dim) float32, in input order."""
        keys = [self._key(t, kwargs) for t in sentences]
        cache: dict[str, np.ndarray] = {}
        if self.cache_path.exists():
            frame = pd.read_parquet(self.cache_path)
            cache = dict(zip(frame["key"], frame["embedding"], strict=True))
        missing = sorted({k: t for k, t in zip(keys, sentences, strict=True) if k not in cache}.items())
        self.misses, self.hits = len(missing), len(set(keys)) - len(missing)
        if missing:
            if self._encoder is None:
                self._encoder = self._load()
            vectors = np.asarray(self._encoder.encode([t for _, t in missing], **kwargs), dtype=np.float32)
            cache.update({k: v for (k, _), v in zip(missing, vectors, strict=True)})
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(".tmp")
            pd.DataFrame({"key": list(cache), "embedding": [np.asarray(v, np.float32) for v in cache.values()]}
                         ).to_parquet(tmp, index=False)
            tmp.replace(self.cache_path)
        logger.info("embedding cache hits=%d misses=%d", self.hits, self.misses)
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([np.asarray(cache[k], dtype=np.float32) for k in keys])
