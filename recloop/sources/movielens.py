"""MovieLens readers: 100K, 1M (also the 10M layout) and latest(-small).

Formats follow the GroupLens READMEs, corrected as docs/data.md records:
ml-100k ``u.data`` is tab-separated while ``u.item``/``u.user`` are pipe-separated and ``u.item``
is latin-1; ml-1m/10m ``*.dat`` use ``::``; ml-latest CSVs are UTF-8 with a header. Every rating
becomes an event of type ``rating`` with ``value`` = the rating. Event order is file order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from recloop.sources.base import SourceError, SourceFrames, read_table, register, users_from_events
from recloop.sources.download import ensure_movielens

logger = logging.getLogger(__name__)

EVENT_NAMES = ["user_id", "item_id", "value", "timestamp"]
ML100K_GENRES_FALLBACK = (
    "unknown|Action|Adventure|Animation|Children's|Comedy|Crime|Documentary|Drama|Fantasy|"
    "Film-Noir|Horror|Musical|Mystery|Romance|Sci-Fi|Thriller|War|Western"
).split("|")


def _events(df: pd.DataFrame, source: str) -> pd.DataFrame:
    df = df.copy()
    df["event_type"] = "rating"
    df["source"] = source
    return df[["user_id", "item_id", "event_type", "value", "timestamp", "source"]]


def _item_text(title: pd.Series, genres: pd.Series, tags: pd.Series | None = None) -> pd.Series:
    parts = [
        f"{t}. {', '.join(g)}." if isinstance(g, list) and g else f"{t}."
        for t, g in zip(title.fillna("").astype(str), genres, strict=True)
    ]
    if tags is not None:
        parts = [
            f"{p} Tags: {tg}." if isinstance(tg, str) and tg else p for p, tg in zip(parts, tags, strict=True)
        ]
    return pd.Series(parts, index=title.index, dtype=object)


def _resolve(name: str, path: Path | None, options: dict[str, Any]) -> Path:
    if path is not None:
        return Path(path)
    return ensure_movielens(name, cache_dir=options.get("cache_dir"), url=options.get("url"))


@register("movielens-100k")
def read_ml100k(path: Path | None = None, **options: Any) -> SourceFrames:
    """Read the ML-100K folder (``u.data``, ``u.item``, ``u.user``, ``u.genre``).

    Args:
        path: the extracted ``ml-100k`` folder; ``None`` downloads it into the cache.
        options: ``cache_dir``/``url`` for the download; ``source_name`` (default the source name).
    Returns:
        Raw frames: 100,000 rating events, 1,682 items (genres as lists of names), 943 users.
    Raises:
        SourceError: a file is empty, mis-separated, mis-encoded or lacks a column.
    """
    root = _resolve("ml-100k", path, options)
    source = options.get("source_name", "movielens-100k")
    events = read_table(root / "u.data", sep="\t", names=EVENT_NAMES)
    genre_file = root / "u.genre"
    if genre_file.exists():
        genre_df = read_table(genre_file, sep="|", names=["genre", "idx"], encoding="latin-1", table="items")
        genre_names = genre_df.sort_values("idx")["genre"].astype(str).tolist()
    else:
        genre_names = ML100K_GENRES_FALLBACK
    item_names = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *genre_names]
    raw_items = read_table(root / "u.item", sep="|", names=item_names, encoding="latin-1", table="items")
    flags = raw_items[genre_names].fillna(0).astype(int).to_numpy() == 1
    genres = pd.Series(
        [[g for g, f in zip(genre_names, row, strict=True) if f] for row in flags], dtype=object
    )
    items = pd.DataFrame(
        {
            "item_id": raw_items["item_id"],
            "title": raw_items["title"],
            "genres": genres,
            "text": _item_text(raw_items["title"], genres),
            "created_at": raw_items["release_date"],
            "imdb_url": raw_items["imdb_url"],
        }
    )
    users = read_table(
        root / "u.user",
        sep="|",
        names=["user_id", "age", "gender", "occupation", "zip_code"],
        table="users",
        dtype={"zip_code": str},
    )
    files = {"events": root / "u.data", "items": root / "u.item", "users": root / "u.user"}
    return _frames(events, items, users, source, root, (1.0, 5.0), files, first_line=1)


@register("movielens-1m")
def read_ml1m(path: Path | None = None, **options: Any) -> SourceFrames:
    """Read the ML-1M folder (``ratings.dat``, ``movies.dat``, ``users.dat``; ``::``; latin-1).

    The ML-10M layout (``ml-10M100K``: no ``users.dat``, a ``tags.dat``, half-star ratings) is
    read by the same code: users then come from the events, tags are folded into item text.

    Args:
        path: the extracted folder; ``None`` downloads ML-1M (``options['variant']='ml-10m'`` for 10M).
        options: ``encoding`` (default latin-1), ``cache_dir``, ``url``, ``source_name``.
    Raises:
        SourceError: a file is empty, mis-separated, mis-encoded or lacks a column.
    """
    variant = options.get("variant", "ml-1m")
    root = _resolve(variant, path, options)
    enc = options.get("encoding", "latin-1")
    source = options.get("source_name", "movielens-1m")
    events = read_table(root / "ratings.dat", sep="::", names=EVENT_NAMES, encoding=enc)
    movies = read_table(
        root / "movies.dat", sep="::", names=["item_id", "title", "genres"], encoding=enc, table="items"
    )
    tags = None
    if (root / "tags.dat").exists():
        raw_tags = read_table(
            root / "tags.dat",
            sep="::",
            names=["user_id", "item_id", "tag", "timestamp"],
            encoding=enc,
            table="items",
        )
        tags = _fold_tags(raw_tags, movies["item_id"])
    genres = movies["genres"].fillna("").astype(str).map(_split_genres)
    items = pd.DataFrame(
        {
            "item_id": movies["item_id"],
            "title": movies["title"],
            "genres": genres,
            "text": _item_text(movies["title"], genres, tags),
        }
    )
    files: dict[str, Path] = {"events": root / "ratings.dat", "items": root / "movies.dat"}
    if (root / "users.dat").exists():
        users = read_table(
            root / "users.dat",
            sep="::",
            names=["user_id", "gender", "age", "occupation", "zip_code"],
            encoding=enc,
            table="users",
            dtype={"zip_code": str},
        )
        files["users"] = root / "users.dat"
    else:
        users = users_from_events(events)
    half = pd.to_numeric(events["value"], errors="coerce").mod(1).gt(0).any()
    return _frames(events, items, users, source, root, (0.5 if half else 1.0, 5.0), files, first_line=1)


@register("movielens-latest")
def read_ml_latest(path: Path | None = None, **options: Any) -> SourceFrames:
    """Read an ml-latest(-small) folder (``ratings.csv``, ``movies.csv``, optional ``tags.csv``).

    Genres are split on ``|`` (``(no genres listed)`` becomes an empty list at coercion); tags
    are folded into the item ``text``. Users come from the ratings (the dataset has no user file).

    Args:
        path: the extracted folder; ``None`` downloads ``ml-latest-small`` (``options['variant']``
            may name ``ml-latest`` for the full one).
        options: ``encoding`` (default utf-8), ``cache_dir``, ``url``, ``source_name``.
    Raises:
        SourceError: a file is empty, mis-separated, mis-encoded or lacks a column.
    """
    root = _resolve(options.get("variant", "ml-latest-small"), path, options)
    enc = options.get("encoding", "utf-8")
    source = options.get("source_name", "movielens-latest")
    ratings = read_table(
        root / "ratings.csv", sep=",", encoding=enc, required=["userId", "movieId", "rating", "timestamp"]
    )
    events = ratings.rename(columns={"userId": "user_id", "movieId": "item_id", "rating": "value"})
    movies = read_table(
        root / "movies.csv", sep=",", encoding=enc, required=["movieId", "title", "genres"], table="items"
    )
    tags = None
    if (root / "tags.csv").exists():
        raw_tags = read_table(
            root / "tags.csv", sep=",", encoding=enc, required=["movieId", "tag"], table="items"
        )
        tags = _fold_tags(raw_tags.rename(columns={"movieId": "item_id"}), movies["movieId"])
    genres = movies["genres"].fillna("").astype(str).map(_split_genres)
    items = pd.DataFrame(
        {
            "item_id": movies["movieId"],
            "title": movies["title"],
            "genres": genres,
            "text": _item_text(movies["title"], genres, tags),
        }
    )
    files = {"events": root / "ratings.csv", "items": root / "movies.csv"}
    return _frames(events, items, users_from_events(events), source, root, (0.5, 5.0), files, first_line=2)


def _frames(
    events: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame,
    source: str,
    root: Path,
    rating_range: tuple[float, float],
    files: dict[str, Path],
    *,
    first_line: int,
) -> SourceFrames:
    """The reader's frames with the meta every MovieLens layout records (``first_line``: 1 or 2 with a header)."""
    return SourceFrames(
        events=_events(events, source),
        items=items,
        users=users,
        meta={
            "source": source,
            "path": str(root),
            "synthetic_timestamps": False,
            "rating_range": rating_range,
            "files": files,
            "first_line": dict.fromkeys(files, first_line),
        },
    )


def _split_genres(value: str) -> list[str]:
    return [g for g in (p.strip() for p in value.split("|")) if g and g != "(no genres listed)"]


def _fold_tags(tags: pd.DataFrame, item_ids: pd.Series) -> pd.Series:
    """Distinct tags per item (first seen first, case-insensitive) joined by ", ", aligned to item_ids."""
    t = tags.dropna(subset=["tag"]).copy()
    t["tag"] = t["tag"].astype(str).str.strip()
    t["key"] = t["tag"].str.lower()
    t = t.drop_duplicates(subset=["item_id", "key"])
    joined = t.groupby("item_id", sort=False)["tag"].agg(", ".join)
    return item_ids.map(joined)


__all__ = ["read_ml100k", "read_ml1m", "read_ml_latest", "SourceError"]
