"""A user forgotten through one worker leaves every other worker's memory within one poll (``sweep_forgotten``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fakes import MemoryLog, MemoryOnline, tiny_served

from recloop.forget import ForgetStore, TombstoneCheck, UserHasher
from serving.recommender import RecommenderCore

T = datetime(2024, 1, 1, tzinfo=UTC)


class CountingStore(ForgetStore):
    """The real store, counting the bulk reads the sweep makes."""

    bulk_reads = 0

    def forgotten(self, user_hashes):  # type: ignore[override]
        self.bulk_reads += 1
        return super().forgotten(user_hashes)


def test_another_workers_forget_reaches_this_workers_memory(tmp_path: Path) -> None:
    hasher = UserHasher(b"k" * 32)
    store = CountingStore(f"sqlite:///{tmp_path / 'log.db'}")
    base = {u: (["i1", "i2"], T) for u in ("u1", "u2", "u3")}
    core = RecommenderCore(tiny_served(), MemoryOnline({}), MemoryLog(), max_seq_len=8, base_history=base,
                           consumed={u: frozenset({"i1", "i2"}) for u in base})
    core.tombstones = TombstoneCheck(store, lambda: hasher)
    assert core.sweep_forgotten() == 0 and store.bulk_reads == 0  # nobody forgotten: one count read only

    store.tombstone(hasher("u2"))  # another worker (or replica) took POST /forget for u2
    assert core.memory_rows("u2") > 0
    assert core.sweep_forgotten() == 1 and store.bulk_reads == 1
    assert core.memory_rows("u2") == 0 and core.memory_rows("u1") > 0 and core.memory_rows("u3") > 0
    assert core.sweep_forgotten() == 0 and store.bulk_reads == 1  # unchanged count: no hashing, no bulk read

    store.tombstone(hasher("someone-else"))  # a user this worker never held: the sweep finds nobody
    assert core.sweep_forgotten() == 0 and store.bulk_reads == 2
    assert {u for u in base if core.memory_rows(u)} == {"u1", "u3"}
    store.close()
