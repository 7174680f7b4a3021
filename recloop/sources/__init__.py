"""Dataset adapters: each returns frames that satisfy recloop.contract.

``read_source`` gives raw frames with contract column names (nothing coerced or dropped);
``load_source`` adds strict coercion, raising ``SourceError`` (a ``ContractError``) that names
the file, line and column of the first bad row.

Sources: movielens-100k, movielens-1m (also the 10M layout), movielens-latest, csv, parquet,
sequence-txt, synthetic.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from recloop.contract import ContractError, coerce_events, coerce_items, coerce_users, parse_timestamps
from recloop.sources import movielens, synthetic, tabular  # noqa: F401  (registers the readers)
from recloop.sources.base import SOURCES, SourceError, SourceFrames
from recloop.sources.checks import conflicting_event_ids, event_problems

__all__ = ["SOURCES", "SourceError", "SourceFrames", "event_problems", "load_source", "read_source"]


def read_source(name: str, path: Path | None = None, **options: Any) -> SourceFrames:
    """Read source ``name`` into raw frames with contract column names.

    Args:
        name: a key of ``SOURCES``.
        path: file or folder of the data; MovieLens sources download into the cache when None.
        options: source-specific options (see each reader's docstring).
    Returns:
        ``SourceFrames`` with raw (uncoerced) values, events in file order; user ids are pseudonyms when
        ``settings.pseudonymize_user_ids`` is on (``pseudonymize_frames``).
    Raises:
        ValueError: unknown ``name`` (the message lists the known ones).
        SourceError: the file cannot be read as the format promises.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; expected one of {sorted(SOURCES)}")
    frames = SOURCES[name](None if path is None else Path(path), **options)
    return pseudonymize_frames(frames)


def pseudonymize_frames(frames: SourceFrames) -> SourceFrames:
    """``frames`` with every user id replaced by its pseudonym when ``settings.pseudonymize_user_ids`` is on
    (``recloop.pseudonym``: ingestion is one of the two doors ids come in by); unchanged otherwise.

    Raises:
        ValueError: pseudonyms are on without a valid ``pseudonym_key``.
    """
    from recloop.pseudonym import from_settings
    from recloop.settings import get_settings

    pseudonym = from_settings(get_settings())
    if pseudonym is None:
        return frames
    return replace(frames, events=pseudonym.frame(frames.events), users=pseudonym.frame(frames.users),
                   meta={**frames.meta, "pseudonymized": True})


def load_source(name: str, path: Path | None = None, **options: Any) -> SourceFrames:
    """``read_source`` then strict coercion of events, items and users to the contract.

    Events keep file order. Event ids missing in the source are derived deterministically
    (``recloop.contract.derive_event_ids``), so loading the same file twice yields the same ids.

    Raises:
        SourceError: the first bad row, naming file, line, column, rule and value (the message
            also says how many rows are bad); or an ``event_id`` repeated with different content.
    """
    frames = read_source(name, path, **options)
    return coerce_frames(frames, timestamp_unit=options.get("timestamp_unit", "s"))


def coerce_frames(frames: SourceFrames, *, timestamp_unit: str = "s") -> SourceFrames:
    """Coerce raw ``frames`` to the contract (see ``load_source``)."""
    raw = frames.events.reset_index(drop=True)
    problems = event_problems(raw, timestamp_unit=timestamp_unit)
    if len(problems):
        first = problems.iloc[0]
        file, line = frames.locate("events", int(first["row"]))
        n_rows = problems["row"].nunique()
        raise SourceError(
            file,
            f"{first['rule']} ({n_rows} bad row(s) in total)",
            column=str(first["column"]),
            line=line,
            value=first["value"],
        )
    raw = raw.copy()
    if "timestamp" in raw.columns:
        raw["timestamp"] = parse_timestamps(raw["timestamp"], timestamp_unit)
    source = frames.meta.get("source")
    events = _wrap(frames, "events", lambda: coerce_events(raw, default_source=source))
    bad = conflicting_event_ids(events)
    if len(bad):
        eid = bad["event_id"].iloc[0]
        rows = bad.loc[bad["event_id"] == eid, "row"].tolist()
        file, line = frames.locate("events", rows[1])
        first_line = frames.locate("events", rows[0])[1]
        raise SourceError(
            file,
            f"event_id {eid!r} appears again with different content (first at line {first_line})",
            column="event_id",
            line=line,
            value=eid,
        )
    items = _wrap(frames, "items", lambda: coerce_items(frames.items))
    users = _wrap(frames, "users", lambda: coerce_users(frames.users))
    return SourceFrames(events=events, items=items, users=users, meta=dict(frames.meta, coerced=True))


def _wrap(frames: SourceFrames, table: str, fn: Any) -> pd.DataFrame:
    try:
        return fn()
    except SourceError:
        raise
    except ContractError as err:
        file = frames.meta.get("files", {}).get(table, frames.meta.get("path", "<memory>"))
        raise SourceError(file, str(err), table=table, column=err.column) from err
