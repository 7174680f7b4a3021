"""Test doubles shared by the serving tests (importable as ``fakes``: pytest's ``pythonpath``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from models.sasrec import SASRec, SASRecConfig
from models.vocab import ItemVocabulary
from serving.recommender import ServedModel, build_served


class MemoryLog:
    """Event log with the documented interface: atomic per call, idempotent on event_id, insertion order."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def append_and_recent(self, event: dict, n: int, after_ts=None) -> tuple[bool, list[str]]:
        with self._lock:
            inserted = event["event_id"] not in self._ids
            if inserted:
                self._ids.add(event["event_id"])
                self.rows.append(dict(event, seq=len(self.rows) + 1))
            return inserted, self._recent(event["user_id"], n, after_ts)

    def _recent(self, user_id: str, n: int, after_ts=None) -> list[str]:
        rows = [r for r in self.rows if r["user_id"] == user_id and (after_ts is None or r["timestamp"] > after_ts)]
        return [r["item_id"] for r in rows][-n:]

    def recent_items(self, user_id: str, n: int, after_ts=None) -> list[str]:
        with self._lock:
            return self._recent(user_id, n, after_ts)

    def get(self, event_id: str) -> dict | None:
        with self._lock:
            return next((r for r in self.rows if r["event_id"] == event_id), None)


class Sink:
    """An exposure sink that keeps every ``record`` call in memory: ``rows[i]`` = {"items": ids, **kwargs}."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def record(self, request_id: str, user_id: str, model_version: str, items: list, **kw: Any) -> bool:
        self.rows.append({"items": [i for i, _ in items], **kw})
        return True


class MemoryOnline:
    """Online store that keeps each user's last pushed list."""

    def __init__(self, seed: dict[str, list[str]] | None = None) -> None:
        self.rows = dict(seed or {})

    def recent_items(self, user_id: str) -> list[str] | None:
        return self.rows.get(user_id)

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> None:
        self.rows[user_id] = list(items)


def tiny_served(seed: int = 0, version: str = "1", popularity: dict[str, float] | None = None,
                max_seq_len: int = 8, titles: dict[str, str] | None = None) -> ServedModel:
    """An untrained 50-item SASRec, ready to serve (items ``i1`` .. ``i50``)."""
    torch.manual_seed(seed)
    vocab = ItemVocabulary([f"i{j}" for j in range(1, 51)])
    model = SASRec(SASRecConfig(n_items=50, max_seq_len=max_seq_len, d_model=16, n_heads=1, n_layers=1, dropout=0.0))
    return build_served(model, vocab, version, "run", {}, titles=titles, popularity=popularity)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0, poll_s: float = 0.02) -> None:
    """Poll ``predicate`` until true. Raises AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(poll_s)


def tiny_checkpoint(path: Path, n_items: int = 30) -> Path:
    """A checkpoint of a tiny SASRec trained for one epoch on seeded toy sequences (items ``i1`` .. ``i<n>``)."""
    import numpy as np

    from models.checkpoint import save_checkpoint
    from models.sequences import leave_one_out
    from models.trainer import TrainConfig, train_model

    vocab = ItemVocabulary([f"i{k}" for k in range(1, n_items + 1)])
    rng = np.random.default_rng(0)
    seqs = {f"u{u}": (rng.integers(0, n_items) + np.arange(rng.integers(5, 10))) % n_items + 1 for u in range(30)}
    config = SASRecConfig(n_items=n_items, max_seq_len=8, d_model=8, n_heads=1, n_layers=1)
    tcfg = TrainConfig(epochs=1, batch_size=16, seed=1, device="cpu", num_threads=1)
    result = train_model(leave_one_out(seqs), vocab, config, tcfg, progress=False)
    return save_checkpoint(path, result.model.cpu(), vocab, {})
