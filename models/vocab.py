"""Item vocabulary: raw ``item_id`` (str) <-> contiguous ``item_idx`` (int), index 0 is padding."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

PAD_IDX = 0
#: ``encode`` looks up at most this many ids in a dict (serving's requests); more go through pandas.
SMALL_ENCODE = 512


class ItemVocabulary:
    """An immutable mapping between catalogue ids and model indices.

    ``item_idx`` runs from 1 to ``len(vocab)``; 0 is reserved for padding and never maps to an item.
    ``len(vocab)`` is ``n_items`` (padding excluded), so embedding tables have ``n_items + 1`` rows.
    """

    def __init__(self, ids: Sequence[str]) -> None:
        """Build from ids already in index order (``ids[0]`` gets index 1).

        Raises:
            ValueError: an id is duplicated or empty.
        """
        ids = [str(i) for i in ids]
        index = pd.Index(ids, dtype=object)
        if index.has_duplicates:
            dup = index[index.duplicated()].tolist()[:5]
            raise ValueError(f"item ids must be unique; duplicated: {dup}")
        if any(i == "" for i in ids):
            raise ValueError("item ids must be non-empty strings; got ''")
        self._ids: tuple[str, ...] = tuple(ids)
        self._index = index
        self._lookup: dict[str, int] | None = None  # id -> position, built on the first small encode

    @property
    def _positions(self) -> dict[str, int]:
        if self._lookup is None:
            self._lookup = {i: k for k, i in enumerate(self._ids)}
        return self._lookup

    @classmethod
    def from_ids(cls, ids: Iterable[object]) -> ItemVocabulary:
        """Vocabulary of the distinct ids, sorted as strings (so independent of event order)."""
        return cls(sorted({str(i) for i in ids}))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemVocabulary) and self._ids == other._ids

    def __repr__(self) -> str:
        return f"ItemVocabulary(n_items={len(self)}, version={self.version!r})"

    @property
    def ids(self) -> tuple[str, ...]:
        """Item ids in index order; ``ids[k]`` has ``item_idx == k + 1``."""
        return self._ids

    @property
    def version(self) -> str:
        """A content hash (12 hex chars) identifying this exact id -> index mapping."""
        return hashlib.sha1("\x1f".join(self._ids).encode()).hexdigest()[:12]

    def encode(self, ids: Iterable[object], unknown: Literal["raise", "pad"] = "raise") -> np.ndarray:
        """Map item ids to indices.

        Args:
            ids: raw item ids (converted with ``str``).
            unknown: ``"raise"`` rejects unknown ids; ``"pad"`` maps them to 0 (padding).
        Returns:
            (n,) int64 array of item_idx.
        Raises:
            KeyError: an id is unknown and ``unknown="raise"`` (the message lists examples).
            ValueError: ``unknown`` is not one of "raise", "pad".
        """
        if unknown not in ("raise", "pad"):
            raise ValueError(f"unknown={unknown!r}; expected 'raise' or 'pad'")
        values = [str(i) for i in ids]
        if len(values) <= SMALL_ENCODE:  # a request's few ids: a dict lookup, not pandas' ~0.3 ms indexer
            pos = np.fromiter((self._positions.get(v, -1) for v in values), dtype=np.int64, count=len(values))
        else:
            pos = self._index.get_indexer(values)
        if unknown == "raise" and (pos < 0).any():
            bad = [values[i] for i in np.flatnonzero(pos < 0)[:5]]
            raise KeyError(f"unknown item ids (vocabulary version {self.version}): {bad}")
        return np.where(pos < 0, PAD_IDX, pos + 1).astype(np.int64)

    def decode(self, idx: Iterable[int] | np.ndarray) -> list[str]:
        """Map indices back to item ids.

        Raises:
            IndexError: an index is 0 (padding) or greater than ``n_items``.
        """
        arr = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64).ravel()
        bad = arr[(arr < 1) | (arr > len(self))]
        if len(bad):
            raise IndexError(f"item_idx out of range 1..{len(self)} (0 is padding): {bad[:5].tolist()}")
        return [self._ids[i - 1] for i in arr]

    def extend(self, new_ids: Iterable[object]) -> ItemVocabulary:
        """A new vocabulary with unseen ids appended (sorted); existing indices are unchanged.

        Used for warm starts: rows 1..len(self) of an old embedding table stay valid.
        """
        fresh = sorted({str(i) for i in new_ids} - set(self._ids))
        return ItemVocabulary(list(self._ids) + fresh)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``{"ids": [...], "version": str}``."""
        return {"ids": list(self._ids), "version": self.version}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemVocabulary:
        """Inverse of ``to_dict``.

        Raises:
            KeyError: ``data`` has no ``"ids"``.
            ValueError: the stored version does not match the ids (corrupted payload).
        """
        if "ids" not in data:
            raise KeyError(f"vocabulary dict needs 'ids'; got keys {sorted(data)}")
        vocab = cls(data["ids"])
        if data.get("version") not in (None, vocab.version):
            raise ValueError(
                f"vocabulary version {data['version']!r} does not match its ids ({vocab.version})"
            )
        return vocab
