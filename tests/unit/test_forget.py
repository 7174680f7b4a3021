"""Forgetting a user (recloop/forget.py): the keyed hash, the coverage of every user-keyed store, the filters."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import MetaData

from recloop import forget as F
from recloop.forget_handlers import ParquetFilesHandler, ValidationDocsHandler


def test_the_hash_is_keyed_normalised_and_the_key_file_is_private(tmp_path: Path) -> None:
    key = F.load_key(None, tmp_path, create=True)
    assert key is not None and F.load_key(None, tmp_path) == key  # generated once, then read back
    assert stat.S_IMODE(F.salt_path(tmp_path).stat().st_mode) == 0o600
    h = F.UserHasher(key)
    assert h(" 42 ") == h("42") == h(42.0)  # the contract's normal form
    assert len(h("42")) == 64 and h("42") != F.UserHasher(b"other")("42")  # another key, another hash
    assert F.load_key("configured", tmp_path) == b"configured"  # the setting wins over the file
    assert F.load_key(None, tmp_path / "none") is None  # nothing forgotten there: no file is made
    assert not (tmp_path / "none").exists()
    assert "42" not in F.log_id("42") and F.log_id("42") == F.log_id("42")


def test_every_table_with_a_user_column_has_a_store_with_a_handler() -> None:
    from recloop.logdb import log_tables

    tables = log_tables(MetaData())
    with_user = {t.name for t in vars(tables).values() if {"user_id", "user_hash"} & set(t.columns.keys())}
    assert with_user, "the schema has user-keyed tables"
    missing = with_user - set(F.TABLE_STORES)
    assert not missing, f"tables with a user column but no forget handler: {missing} (recloop.forget.TABLE_STORES)"
    assert {F.TABLE_STORES[t] for t in with_user} - {"receipt"} <= set(F.STORES)


def test_every_parquet_file_with_a_user_column_in_a_home_is_covered(tmp_path: Path, recloop_home: Path) -> None:
    """Builds a home with the real writers (lake, quarantine, feature tables) and fails on any Parquet file
    with a user column outside the folders the handlers cover (``recloop.forget.FILE_STORES``)."""
    from featurestore.materialize import build_feature_tables, write_feature_tables
    from recloop.contract import coerce_items, coerce_users
    from recloop.lake import Lake
    from recloop.quarantine import as_text_columns, split_events
    from recloop.sources import SourceFrames

    raw = pd.DataFrame({"user_id": ["u1", "u2", "u2", None], "item_id": ["i1", "i2", "i1", "i3"],
                        "event_type": ["click"] * 4, "timestamp": ["2024-01-01T00:00:00Z"] * 4})
    split = split_events(raw, "csv")
    frames = SourceFrames(events=split.good, items=coerce_items(pd.DataFrame({"item_id": ["i1", "i2"],
                                                                              "title": ["a", "b"]})),
                          users=coerce_users(pd.DataFrame({"user_id": ["u1", "u2"], "age": [30, 40]})), meta={})
    Lake(recloop_home / "lake").ingest(frames)
    (recloop_home / "quarantine" / "b1").mkdir(parents=True)
    as_text_columns(split.rejected).to_parquet(recloop_home / "quarantine" / "b1" / "quarantined.parquet")
    now = datetime.now(UTC)
    write_feature_tables(build_feature_tables(split.good, None, n=5, created_ts=now, as_of=now, encoder=None),
                         recloop_home / "features")
    import pyarrow.parquet as pq

    files = [p for p in recloop_home.rglob("*.parquet") if "user_id" in pq.read_schema(p).names]
    assert len(files) >= 4  # lake events + users, quarantine, user feature tables
    for path in files:
        top = path.relative_to(recloop_home).parts[0]
        assert F.FILE_STORES.get(top) in F.STORES, f"{path} has a user column but no forget handler covers {top}/"


def test_every_store_has_a_handler_in_the_assembled_list(recloop_home: Path) -> None:
    from recloop.forget_handlers import close_handlers
    from recloop.settings import get_settings
    from serving.forget import forget_handlers

    handlers = forget_handlers(get_settings())
    try:
        names = {h.name for h in handlers}
        assert set(F.STORES) <= names
        assert names <= set(F.STORES) | set(F.OPTIONAL_STEPS)
    finally:
        close_handlers(handlers)


def test_run_forget_refuses_a_missing_handler_and_a_bad_id(recloop_home: Path) -> None:
    from recloop.settings import get_settings

    with pytest.raises(ValueError, match="no forget handler for stores"):
        F.run_forget("u1", get_settings(), [])
    with pytest.raises(ValueError, match="user_id"):
        F.run_forget("", get_settings(), [])


def test_drop_forgotten_compares_raw_ids_in_normal_form() -> None:
    frame = pd.DataFrame({"user_id": [1, " 1", "2", None, 1.0], "item_id": list("abcde")})
    kept, n = F.drop_forgotten(frame, lambda ids: {i for i in ids if i == "1"})
    assert n == 3 and kept["item_id"].tolist() == ["c", "d"]
    same, n = F.drop_forgotten(frame, None)
    assert n == 0 and same is frame


def test_parquet_and_validation_docs_handlers_remove_only_the_user(tmp_path: Path) -> None:
    q = tmp_path / "quarantine" / "b1"
    q.mkdir(parents=True)
    pd.DataFrame({"user_id": ["7.0", "70", "7"], "value": ["9", "9", "9"]}).to_parquet(q / "quarantined.parquet")
    (q / "result.json").write_text(json.dumps({"gx": {"unexpected_list": ["7", "70", 7], "7": 1}}))
    docs = tmp_path / "data_docs"
    docs.mkdir()
    (docs / "index.html").write_text("<td>7</td><td>70</td><span>17</span><td> 7 </td>")
    files = ParquetFilesHandler("quarantine", tmp_path / "quarantine")
    assert files.delete("7") == 2 and files.remaining("7") == 0
    assert pd.read_parquet(q / "quarantined.parquet")["user_id"].tolist() == ["70"]
    docs_handler = ValidationDocsHandler(tmp_path)
    assert docs_handler.remaining("7") == 4
    assert docs_handler.delete("7") == 4 and docs_handler.remaining("7") == 0
    assert json.loads((q / "result.json").read_text()) == {"gx": {"unexpected_list": ["[forgotten]", "70", 7],
                                                                   "[forgotten]": 1}}
    assert (docs / "index.html").read_text() == "<td>[forgotten]</td><td>70</td><span>17</span><td> [forgotten] </td>"


class _Tombstones:
    """``recloop.forget.TombstoneCheck``'s interface over a set of forgotten ids."""

    def __init__(self, gone: set[str]) -> None:
        self.gone = gone

    def is_forgotten(self, user_id: str) -> bool:
        return user_id in self.gone

    def hash_of(self, user_id: str) -> str:
        return "h" * 64

    def forgotten_ids(self, user_ids) -> set[str]:
        return set(user_ids) & self.gone


def test_a_forgotten_user_is_unknown_to_the_serving_core_and_its_feedback_refused() -> None:
    from fakes import MemoryLog, MemoryOnline, Sink, tiny_served

    from serving.recommender import RecommenderCore

    served = tiny_served()
    known = served.vocab.decode([1, 2, 3])
    now = datetime.now(UTC)
    sink = Sink()
    core = RecommenderCore(served, MemoryOnline({"x": known, "y": known}), MemoryLog(), max_seq_len=8, exposures=sink,
                           base_history={"x": (known, now), "y": (known, now)}, consumed={"x": frozenset(known)})
    assert core.recommend("x", k=3)["cold_start"] is False
    core.tombstones = _Tombstones({"x"})
    answer = core.recommend("x", k=3)
    assert answer["cold_start"] is True and answer["strategy"] == "popularity"
    assert len(sink.rows) == 1  # the forgotten user's answer is not recorded
    assert core.memory_rows("x") == 0 and "y" in core.base_history  # dropped from this process's memory
    with pytest.raises(F.UserForgotten):
        core.feedback("x", known[0], "click")
    assert core.recommend("y", k=3)["cold_start"] is False
