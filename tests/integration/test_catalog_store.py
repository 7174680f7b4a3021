"""The new-item catalogue (recloop/catalog.py) on SQLite and PostgreSQL, and its TTL cache."""

from __future__ import annotations

import pytest
from conftest import LogDb

from recloop.catalog import CachedCatalog, CatalogStore


def test_add_update_list_round_trip_and_a_second_worker_within_the_ttl(log_db: LogDb) -> None:
    store = CatalogStore(log_db.url, events_table=log_db.events_table)
    reader = CatalogStore(log_db.url, events_table=log_db.events_table, create=False)
    now = [0.0]
    cache = CachedCatalog(reader, ttl_s=5.0, clock=lambda: now[0])
    try:
        assert cache.rows()[0] == ()
        assert store.add([{"item_id": " n1", "title": "Space  robots", "genres": ["Sci-Fi", "Sci-Fi"]},
                          {"item_id": "n2", "title": "Love", "text": "A romance.\nIn Paris."}]) == ["n1", "n2"]
        assert store.add([{"item_id": "n1", "title": "Space robots II"}]) == []  # an update, not a duplicate
        rows = {r["item_id"]: r for r in store.list()}
        assert rows["n1"]["title"] == "Space robots II" and rows["n1"]["genres"] == []
        assert rows["n2"]["text"] == "A romance.\nIn Paris." and rows["n2"]["genres"] == []
        frame = store.items_frame()
        assert list(frame.columns) == ["item_id", "title", "genres", "text", "created_at"]
        assert str(frame["created_at"].dt.tz) == "UTC"
        assert cache.rows()[0] == ()  # still within the TTL
        now[0] = 5.0
        rows2, version = cache.rows()
        assert [r["item_id"] for r in rows2] == ["n1", "n2"]
        store.add([{"item_id": "n2", "title": "Love again"}])
        now[0] = 10.0
        assert cache.rows()[1] != version  # an edit changes the version
    finally:
        store.close()
        reader.close()


def test_bad_items_store_nothing(log_db: LogDb) -> None:
    with CatalogStore(log_db.url, events_table=log_db.events_table) as store:
        for bad, field in (({"item_id": "ok", "title": "t\x00"}, "title"), ({"item_id": "", "title": "t"}, "item_id"),
                           ({"item_id": "ok", "title": "t", "genres": ["a|b"]}, "genres")):
            with pytest.raises(ValueError, match=field):
                store.add([{"item_id": "fine", "title": "fine"}, bad])
        assert store.list() == []
