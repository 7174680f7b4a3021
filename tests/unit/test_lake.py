"""The Parquet lake: idempotent ingestion, watermarks, order, latest versions, atomic batches."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from recloop.contract import EVENT_COLUMNS
from recloop.lake import Lake
from recloop.sources import SourceFrames, load_source


@pytest.fixture(scope="module")
def ml100k(ml100k_path: Path) -> SourceFrames:
    return load_source("movielens-100k", ml100k_path)


def test_ingest_ml100k_then_reingest_adds_nothing(tmp_path: Path, ml100k: SourceFrames) -> None:
    lake = Lake(tmp_path / "lake")
    first = lake.ingest(ml100k)
    assert (first.events, first.users, first.items) == (100_000, 943, 1_682)
    assert first.new_events == 100_000 and first.duplicates_dropped == 0
    max_ts = ml100k.events["timestamp"].max()
    assert first.watermark == max_ts == lake.watermark("movielens-100k") == lake.watermark()
    assert max_ts == pd.Timestamp(893286638, unit="s", tz="UTC")  # docs/data.md
    again = lake.ingest(ml100k)
    assert again.new_events == 0 and again.duplicates_dropped == 100_000
    assert again.new_items == 0 and again.new_users == 0 and again.total_events == 100_000
    events = lake.events()
    assert len(events) == 100_000 and tuple(events.columns) == EVENT_COLUMNS
    assert str(events["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert len(lake.items()) == 1_682 and len(lake.users()) == 943
    assert lake.items().set_index("item_id").loc["1", "genres"] == ["Animation", "Children's", "Comedy"]
    assert lake.watermark("other-source") is None
    assert len(lake.batches()) == 2


def test_events_are_ordered_by_timestamp_then_file_order(tmp_path: Path, ml100k: SourceFrames) -> None:
    lake = Lake(tmp_path)
    lake.ingest(ml100k)
    out = lake.events(with_lineage=True)
    assert out["timestamp"].is_monotonic_increasing
    # within equal timestamps, the original row order (seq) decides
    assert (out.groupby("timestamp")["seq"].diff().dropna() > 0).all()
    expected = ml100k.events.reset_index().sort_values(["timestamp", "index"], kind="stable")
    assert out["event_id"].tolist() == expected["event_id"].tolist()
    # the Parquet folder is also readable directly
    assert len(pd.read_parquet(tmp_path / "events")) == 100_000


def test_events_since_and_watermark_per_source(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    syn = load_source("synthetic", seed=1, n_users=50, n_items=40, n_events=500)
    lake.ingest(syn)
    wm = lake.watermark("synthetic")
    assert wm == syn.events["timestamp"].max()
    later = syn.events.tail(5).copy()
    later["timestamp"] = later["timestamp"] + pd.Timedelta(days=1)
    later["event_id"] = [f"late-{k}" for k in range(5)]
    report = lake.ingest(SourceFrames(later.reset_index(drop=True), meta={"source": "synthetic"}))
    assert report.new_events == 5
    since = lake.events_since(wm)
    assert since["event_id"].tolist() == [f"late-{k}" for k in range(5)]
    assert lake.watermark() == later["timestamp"].max()


def test_items_keep_latest_version(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    syn = load_source("synthetic", seed=1, n_users=20, n_items=30, n_events=200)
    lake.ingest(syn)
    items = syn.items.copy()
    items.loc[0, "title"] = "Renamed"
    report = lake.ingest(SourceFrames(syn.events, items=items, users=syn.users, meta=syn.meta))
    assert report.new_items == 1 and report.new_events == 0
    assert lake.items().set_index("item_id").loc[items.loc[0, "item_id"], "title"] == "Renamed"
    assert len(lake.items()) == 30


def test_conflicting_event_id_against_lake_writes_nothing(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    syn = load_source("synthetic", seed=2, n_users=20, n_items=30, n_events=200)
    lake.ingest(syn)
    before = (lake.events(), lake.batches())
    changed = syn.events.copy()
    changed.loc[3, "item_id"] = "i9999"
    with pytest.raises(ValueError, match=f"event_id '{changed.loc[3, 'event_id']}' is already in the lake"):
        lake.ingest(SourceFrames(changed, meta=syn.meta))
    pd.testing.assert_frame_equal(lake.events(), before[0])
    assert lake.batches() == before[1]


def test_failed_write_leaves_no_visible_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = Lake(tmp_path)
    syn = load_source("synthetic", seed=2, n_users=20, n_items=30, n_events=200)
    calls = {"n": 0}
    real = pd.DataFrame.to_parquet

    def flaky(self: pd.DataFrame, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # events written, items fail
            raise OSError("disk full")
        real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    with pytest.raises(OSError, match="disk full"):
        lake.ingest(syn)
    monkeypatch.undo()
    assert lake.events().empty and lake.batches() == [] and lake.watermark() is None
    assert not (tmp_path / "events").exists() or not any((tmp_path / "events").iterdir())
    assert lake.ingest(syn).new_events == 200


def test_uncoerced_frames_and_bad_batch_ids_are_refused(tmp_path: Path, ml100k_path: Path) -> None:
    from recloop.sources import read_source

    lake = Lake(tmp_path)
    with pytest.raises(ValueError, match="contract-coerced"):
        lake.ingest(read_source("movielens-100k", ml100k_path))
    syn = load_source("synthetic", seed=2, n_users=20, n_items=30, n_events=200)
    with pytest.raises(ValueError, match="batch_id '../x'"):
        lake.ingest(syn, batch_id="../x")
    lake.ingest(syn, batch_id="b1")
    with pytest.raises(ValueError, match="already exists"):
        lake.ingest(syn, batch_id="b1")


def test_cli_ingest_json(recloop_home: Path, ml100k_path: Path) -> None:
    from cli.main import app

    runner = CliRunner()
    args = ["ingest", "--source", "movielens-100k", "--path", str(ml100k_path), "--json"]
    first = json.loads(runner.invoke(app, args).stdout)
    assert {k: first[k] for k in ("events", "users", "items", "new_events", "duplicates_dropped")} == {
        "events": 100_000,
        "users": 943,
        "items": 1_682,
        "new_events": 100_000,
        "duplicates_dropped": 0,
    }
    assert pd.Timestamp(first["watermark"]) == pd.Timestamp(893286638, unit="s", tz="UTC")
    second = json.loads(runner.invoke(app, args).stdout)
    assert second["new_events"] == 0 and second["duplicates_dropped"] == 100_000
    assert (recloop_home / "lake" / "events").is_dir()
    bad = runner.invoke(
        app, ["ingest", "--source", "movielens-100k", "--path", str(recloop_home / "missing")]
    )
    assert bad.exit_code == 1 and "not found" in bad.output
