"""Sources: real MovieLens counts, the other layouts, the synthetic generator and the downloader."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from recloop.contract import EVENT_COLUMNS
from recloop.sources import SOURCES, load_source, read_source
from recloop.sources.download import ensure_movielens


def test_registry_names() -> None:
    expected = {
        "movielens-100k",
        "movielens-1m",
        "movielens-latest",
        "csv",
        "parquet",
        "sequence-txt",
        "synthetic",
    }
    assert expected <= set(SOURCES)
    with pytest.raises(ValueError, match="unknown source 'nope'.*movielens-100k"):
        read_source("nope")


def test_ml100k_counts_titles_and_genres(ml100k_path: Path) -> None:
    frames = load_source("movielens-100k", ml100k_path)
    ev = frames.events
    assert tuple(ev.columns) == EVENT_COLUMNS
    assert len(ev) == 100_000
    assert ev["user_id"].nunique() == 943 and ev["item_id"].nunique() == 1682
    assert len(frames.items) == 1682 and len(frames.users) == 943
    assert set(ev["event_type"]) == {"rating"} and ev["value"].between(1, 5).all()
    toy = frames.items.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["genres"] == ["Animation", "Children's", "Comedy"]
    assert "Toy Story" in toy["text"] and "Animation" in toy["text"]
    # latin-1 title survives (item 1633, docs/data.md)
    assert frames.items.set_index("item_id").loc["1633", "title"].startswith("Á köldum klaka")
    assert frames.users.set_index("user_id").loc["1", "occupation"] == "technician"
    # file order is kept: first line of u.data is 196 242 3 881250949
    assert ev.iloc[0][["user_id", "item_id", "value"]].tolist() == ["196", "242", 3.0]
    assert ev["timestamp"].iloc[0] == pd.Timestamp(881250949, unit="s", tz="UTC")
    assert frames.meta["rating_range"] == (1.0, 5.0) and frames.meta["synthetic_timestamps"] is False


def test_read_source_keeps_raw_values(ml100k_path: Path) -> None:
    raw = read_source("movielens-100k", ml100k_path).events
    assert {"user_id", "item_id", "event_type", "value", "timestamp", "source"} <= set(raw.columns)
    assert pd.api.types.is_integer_dtype(raw["timestamp"])  # not yet coerced to datetimes


def test_ml_latest_small_counts_and_tags(ml_latest_small_path: Path) -> None:
    frames = load_source("movielens-latest", ml_latest_small_path)
    assert len(frames.events) == 100_836
    assert frames.events["user_id"].nunique() == 610 and len(frames.users) == 610
    assert len(frames.items) == 9_742
    assert frames.events["value"].min() == 0.5
    toy = frames.items.set_index("item_id").loc["1"]
    assert toy["genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert "Tags:" in toy["text"] and "pixar" in toy["text"]
    no_genre = frames.items[frames.items["genres"].map(len) == 0]
    assert len(no_genre) == 34  # "(no genres listed)"


def test_ml1m_layout_with_double_colon(tmp_path: Path, ml100k_path: Path) -> None:
    u = pd.read_csv(ml100k_path / "u.data", sep="\t", header=None).head(500)
    (tmp_path / "ratings.dat").write_text(
        "\n".join("::".join(map(str, r)) for r in u.itertuples(index=False)) + "\n"
    )
    (tmp_path / "movies.dat").write_bytes(
        "1::Café (1995)::Comedy|Drama\n2::B (1996)::Action\n".encode("latin-1")
    )
    (tmp_path / "users.dat").write_text("196::M::25::4::55455\n")
    frames = load_source("movielens-1m", tmp_path)
    assert len(frames.events) == 500 and frames.events["value"].iloc[0] == u.iloc[0, 2]
    assert frames.items["title"].iloc[0] == "Café (1995)" and frames.items["genres"].iloc[0] == [
        "Comedy",
        "Drama",
    ]
    assert frames.users["zip_code"].iloc[0] == "55455"
    (tmp_path / "users.dat").unlink()  # the 10M layout has no users.dat
    (tmp_path / "tags.dat").write_text("196::1::cozy::881250949\n")
    frames = load_source("movielens-1m", tmp_path)
    assert len(frames.users) == u[0].nunique() and "cozy" in frames.items["text"].iloc[0]


def test_csv_and_parquet_with_column_mapping(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "uid": ["a", "b", "a"],
            "sku": ["x1", "x2", "x3"],
            "when": ["2024-01-01T10:00Z"] * 3,
            "kind": ["click", "view", "purchase"],
        }
    )
    cols = {"uid": "user_id", "sku": "item_id", "when": "timestamp", "kind": "event_type"}
    df.to_csv(tmp_path / "e.csv", index=False)
    df.to_parquet(tmp_path / "e.parquet")
    a = load_source("csv", tmp_path / "e.csv", columns=cols)
    b = load_source("parquet", tmp_path / "e.parquet", columns=cols)
    pd.testing.assert_frame_equal(
        a.events.drop(columns=["source", "event_id"]), b.events.drop(columns=["source", "event_id"])
    )
    assert a.events["event_type"].tolist() == ["click", "view", "purchase"]
    assert a.events["timestamp"].iloc[0] == pd.Timestamp("2024-01-01T10:00Z")
    assert a.users["user_id"].tolist() == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "layout"),
    [("1 10\n1 11\n2 10\n1 12\n", "pairs"), ("1 10 11 12\n2 10\n", "lines")],
)
def test_sequence_txt_both_layouts_synthesize_monotonic_time(tmp_path: Path, text: str, layout: str) -> None:
    (tmp_path / "seq.txt").write_text(text)
    frames = load_source("sequence-txt", tmp_path / "seq.txt")
    assert frames.meta["synthetic_timestamps"] is True and frames.meta["layout"] == layout
    ev = frames.events
    assert ev[ev["user_id"] == "1"]["item_id"].tolist() == ["10", "11", "12"]
    assert ev["timestamp"].is_monotonic_increasing and ev["timestamp"].is_unique


def test_synthetic_is_deterministic_long_tailed_and_sequential() -> None:
    a, b = read_source("synthetic", seed=3), read_source("synthetic", seed=3)
    for x, y in [(a.events, b.events), (a.items, b.items), (a.users, b.users)]:
        pd.testing.assert_frame_equal(x, y)
    assert not read_source("synthetic", seed=4).events.equals(a.events)
    frames = load_source("synthetic", seed=3)
    ev = frames.events
    assert len(ev) == 50_000 and ev["user_id"].nunique() == 1000 and len(frames.items) == 500
    counts = ev["item_id"].value_counts()
    assert counts.iloc[: len(frames.items) // 10].sum() / len(ev) >= 0.40
    assert frames.items["title"].str.len().min() > 5 and frames.items["genres"].map(len).min() >= 1
    # sequential signal: "most frequent successor of the previous item" beats MostPop on the last item
    ev = ev.reset_index(drop=True)
    last = ev.groupby("user_id").tail(1)
    train = ev.drop(last.index)
    nxt = train.assign(nxt=train.groupby("user_id")["item_id"].shift(-1)).dropna(subset=["nxt"])
    pairs = nxt.groupby(["item_id", "nxt"]).size().sort_values(ascending=False)
    top_next = {k: g.index.get_level_values(1)[:10].tolist() for k, g in pairs.groupby(level=0)}
    pop = train["item_id"].value_counts().index[:10].tolist()
    prev = train.groupby("user_id")["item_id"].last()
    hr_pop = np.mean([i in pop for i in last["item_id"]])
    hr_seq = np.mean(
        [i in top_next.get(prev[u], pop) for u, i in zip(last["user_id"], last["item_id"], strict=True)]
    )
    assert hr_seq > 1.5 * hr_pop, (hr_seq, hr_pop)


def _zip_of(folder: Path, dest: Path, name: str) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                zf.write(f, f"{name}/{f.name}")
    return dest


def test_download_from_local_archive_then_cache(tmp_path: Path, ml100k_path: Path) -> None:
    archive = _zip_of(ml100k_path, tmp_path / "ml-100k.zip", "ml-100k")
    (tmp_path / "ml-100k.zip.md5").write_text(
        hashlib.md5(archive.read_bytes()).hexdigest() + "  ml-100k.zip\n"
    )
    cache = tmp_path / "cache"
    frames = load_source("movielens-100k", None, cache_dir=cache, url=str(archive))
    assert len(frames.events) == 100_000 and (cache / "ml-100k" / "u.data").is_file()
    archive.unlink()  # second call is served from the cache
    assert ensure_movielens("ml-100k", cache_dir=cache, url=str(archive)) == cache / "ml-100k"


def test_download_over_http_verifies_md5(tmp_path: Path, ml100k_path: Path) -> None:
    payload = _zip_of(ml100k_path, tmp_path / "a.zip", "ml-100k").read_bytes()
    good_md5 = hashlib.md5(payload).hexdigest()

    def serve(md5: str) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith(".md5"):
                return httpx.Response(200, text=f"{md5}  ml-100k.zip")
            return httpx.Response(200, content=payload)

        return httpx.MockTransport(handler)

    with pytest.raises(ValueError, match="md5 .* does not match"):
        ensure_movielens("ml-100k", cache_dir=tmp_path / "c1", transport=serve("0" * 32))
    assert not (tmp_path / "c1" / "ml-100k").exists()  # nothing half-extracted
    out = ensure_movielens("ml-100k", cache_dir=tmp_path / "c2", transport=serve(good_md5))
    assert (out / "u.item").read_bytes() == (ml100k_path / "u.item").read_bytes()


def test_download_rejects_corrupt_archive(tmp_path: Path) -> None:
    bad = tmp_path / "ml-100k.zip"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="not a valid zip"):
        ensure_movielens("ml-100k", cache_dir=tmp_path / "c", url=str(bad))
