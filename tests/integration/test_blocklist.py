"""The catalogue-wide blocklist (recloop/blocklist.py) on SQLite and PostgreSQL, and its TTL cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import LogDb

from recloop import logdb
from recloop.blocklist import BlocklistStore, CachedBlocklist


@pytest.fixture
def store(log_db: LogDb) -> Iterator[BlocklistStore]:
    s = BlocklistStore(log_db.url, events_table=log_db.events_table)
    yield s
    s.close()


def test_add_remove_list_round_trip(store: BlocklistStore) -> None:
    assert logdb.current_revision(store.engine, store.names.events) == logdb.HEAD_REVISION
    assert store.add(["i1", " i2", "i1"], reason="takedown") == ["i1", "i2"]  # normalised, deduplicated
    assert store.add(["i2", "i3"], kind="retired") == ["i3"]  # i2 is updated, not duplicated
    rows = {r["item_id"]: r for r in store.list()}
    assert list(rows) == ["i1", "i2", "i3"]
    assert (rows["i1"]["kind"], rows["i1"]["reason"]) == ("blocked", "takedown")
    assert (rows["i2"]["kind"], rows["i2"]["reason"]) == ("retired", None)
    assert store.item_ids() == {"i1", "i2", "i3"}
    assert store.remove(["i2", "nope"]) == ["i2"]
    assert store.item_ids() == {"i1", "i3"}


def test_bad_input_names_the_value(store: BlocklistStore) -> None:
    with pytest.raises(ValueError, match="kind='gone'"):
        store.add(["i1"], kind="gone")
    with pytest.raises(ValueError, match="item_id"):
        store.add([""])
    assert store.item_ids() == frozenset()


def test_a_second_worker_sees_a_change_within_the_ttl(log_db: LogDb) -> None:
    writer = BlocklistStore(log_db.url, events_table=log_db.events_table)
    reader = BlocklistStore(log_db.url, events_table=log_db.events_table, create=False)
    now = [0.0]
    cache = CachedBlocklist(reader, ttl_s=5.0, clock=lambda: now[0])
    try:
        assert cache.item_ids() == frozenset()
        writer.add(["i7"])
        assert cache.item_ids() == frozenset()  # still within the TTL
        now[0] = 5.0
        assert cache.item_ids() == {"i7"}
    finally:
        writer.close()
        reader.close()


class _Broken:
    def __init__(self) -> None:
        self.ids, self.fail = frozenset({"i1"}), False

    def item_ids(self) -> frozenset[str]:
        if self.fail:
            raise ConnectionError("down")
        return self.ids


def test_a_store_outage_keeps_the_last_ids() -> None:
    store, now = _Broken(), [0.0]
    cache = CachedBlocklist(store, ttl_s=1.0, clock=lambda: now[0])
    assert cache.item_ids() == {"i1"}
    store.fail, now[0] = True, 2.0
    assert cache.item_ids() == {"i1"} and "down" in (cache.last_error or "")


def test_a_0005_database_upgrades_to_head_keeping_its_rows(log_db: LogDb) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import MetaData, Table, inspect, select

    config = Config()
    config.set_main_option("script_location", str(logdb.MIGRATIONS_DIR))
    names = logdb.table_names(log_db.events_table)
    with log_db.engine.begin() as conn:
        config.attributes["connection"] = conn
        config.attributes["log_table_names"] = names
        command.upgrade(config, "0005")
    assert names.blocklist not in inspect(log_db.engine).get_table_names()
    experiments = Table(names.experiments, MetaData(), autoload_with=log_db.engine)
    with log_db.engine.begin() as conn:
        conn.execute(experiments.insert().values(
            experiment_id="exp-1", mode="ab", champion_version="1", challenger_version="2", weight_champion=1.0,
            weight_challenger=1.0, salt="s", status="stopped", started_at=logdb.UTCDateTime().process_bind_param(
                "2024-05-01T00:00:00Z", log_db.engine.dialect)))
    store = BlocklistStore(log_db.url, events_table=log_db.events_table)  # opening it upgrades
    try:
        assert logdb.current_revision(store.engine, log_db.events_table) == logdb.HEAD_REVISION
        with store.engine.connect() as conn:
            assert conn.execute(select(experiments.c.experiment_id)).scalars().all() == ["exp-1"]
        store.add(["i1"])
        assert store.item_ids() == {"i1"}
    finally:
        store.close()


def test_the_cli_adds_removes_and_lists_with_one_json_document(recloop_home) -> None:
    import json

    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    added = runner.invoke(app, ["blocklist", "add", "50", "181", "--reason", "takedown", "--json"])
    assert added.exit_code == 0, added.output
    doc = json.loads(added.stdout)
    assert doc["changed"] == ["50", "181"] and [r["item_id"] for r in doc["items"]] == ["181", "50"]
    assert json.loads(runner.invoke(app, ["blocklist", "remove", "50", "--json"]).stdout)["changed"] == ["50"]
    listed = json.loads(runner.invoke(app, ["blocklist", "list", "--json"]).stdout)
    assert [(r["item_id"], r["reason"]) for r in listed["items"]] == [("181", "takedown")]
    bad = runner.invoke(app, ["blocklist", "add", "x", "--kind", "gone", "--json"])
    assert bad.exit_code == 1 and "kind='gone'" in bad.output
