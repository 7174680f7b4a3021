"""The validation gate on real MovieLens and on copies of ml-100k with injected faults.

Each fault gives the documented outcome (flows/validate.py policy): stop, or quarantine of exactly
the bad rows while the rest continue.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.validate import GateConfig, ValidationOutcome, validate_batch
from recloop.sources import read_source

AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
ML100K_GATE = GateConfig(rating_min=1.0, rating_max=5.0)


def _copy_ml100k(src: Path, dst: Path, mutate: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    """Copy ml-100k into ``dst`` with ``u.data`` (read as text columns 0..3) rewritten by ``mutate``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("u.item", "u.user", "u.genre"):
        shutil.copy(src / name, dst / name)
    data = pd.read_csv(src / "u.data", sep="\t", header=None, dtype=str, keep_default_na=False)
    mutate(data).to_csv(dst / "u.data", sep="\t", header=False, index=False)
    return dst


def _validate(path: Path, config: GateConfig = ML100K_GATE) -> ValidationOutcome:
    frames = read_source("movielens-100k", path)
    return validate_batch(frames.events, frames.items, frames.users, source="movielens-100k", as_of=AS_OF,
                          config=config, batch_id="test")  # fmt: skip


@pytest.fixture(scope="module")
def small(ml100k_path: Path):
    """The first 20,000 ml-100k events with the full catalogue (for the checks that need no 100k rows)."""
    frames = read_source("movielens-100k", ml100k_path)
    frames.events = frames.events.iloc[:20_000].copy()
    return frames


def _every(n: int, start: int = 7) -> np.ndarray:
    return np.arange(start, 100_000, n)


def test_clean_ml100k_passes_unchanged(ml100k_path: Path) -> None:
    outcome = _validate(ml100k_path)
    assert outcome.passed and not outcome.failing
    assert (outcome.rows_in, outcome.rows_ok, outcome.rows_quarantined) == (100_000, 100_000, 0)
    assert outcome.events is not None and outcome.events["event_id"].is_unique
    assert outcome.items is not None and len(outcome.items) == 1682
    assert outcome.users is not None and len(outcome.users) == 943


def test_clean_ml_latest_small_passes_unchanged(ml_latest_small_path: Path) -> None:
    frames = read_source("movielens-latest", ml_latest_small_path)
    assert frames.meta["rating_range"] == (0.5, 5.0)
    cfg = GateConfig(rating_min=0.5, rating_max=5.0)
    outcome = validate_batch(
        frames.events, frames.items, frames.users, source="movielens-latest", as_of=AS_OF, config=cfg
    )
    assert outcome.passed, outcome.failing
    assert (outcome.rows_in, outcome.rows_ok, outcome.rows_quarantined) == (100_836, 100_836, 0)


def test_renamed_column_stops(small) -> None:
    frames = small
    events = frames.events.rename(columns={"user_id": "userId"})
    outcome = validate_batch(events, frames.items, source="movielens-100k", as_of=AS_OF, config=ML100K_GATE)
    assert outcome.stopped and not outcome.passed
    assert any("user_id" in f for f in outcome.failing)
    assert outcome.rows_ok == 0


def test_half_percent_rating_7_quarantines_exactly_those_rows(ml100k_path: Path, tmp_path: Path) -> None:
    bad = _every(200)  # 500 rows

    def inject(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[bad, 2] = "7"
        return df

    outcome = _validate(_copy_ml100k(ml100k_path, tmp_path / "ml", inject))
    assert outcome.passed and not outcome.stopped
    assert (outcome.rows_quarantined, outcome.rows_ok, outcome.bad_share) == (500, 99_500, 0.005)
    q = outcome.quarantined
    assert q is not None and sorted(q["row"]) == bad.tolist()
    assert set(q["check"]) == {"events.expect_column_values_to_be_between(value)"}
    assert q["reason"].str.contains(r"value=7\.0 outside \[1\.0, 5\.0\]").all()
    assert outcome.unexpected_counts["events.expect_column_values_to_be_between(value)"] == 500
    assert outcome.events is not None and outcome.events["value"].between(1, 5).all()


def test_five_percent_null_user_id_stops(ml100k_path: Path, tmp_path: Path) -> None:
    def inject(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[_every(20, start=0), 0] = ""
        return df

    outcome = _validate(_copy_ml100k(ml100k_path, tmp_path / "ml", inject))
    assert outcome.stopped
    assert any(f.startswith("bad_row_share=0.0500 > max_bad_row_share=0.01") for f in outcome.failing)
    assert outcome.unexpected_counts["contract.user_id"] == 5000


def test_future_timestamps_are_quarantined(ml100k_path: Path, tmp_path: Path) -> None:
    bad = _every(1000)  # 100 rows, one day after the run time
    future = str(int((AS_OF + timedelta(days=1)).timestamp()))

    def inject(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[bad, 3] = future
        return df

    outcome = _validate(_copy_ml100k(ml100k_path, tmp_path / "ml", inject))
    assert outcome.passed
    q = outcome.quarantined
    assert q is not None and sorted(q["row"]) == bad.tolist()
    assert set(q["check"]) == {"events.expect_column_values_to_be_between(timestamp)"}
    assert outcome.events is not None and (outcome.events["timestamp"] <= pd.Timestamp(AS_OF)).all()


def test_timestamp_within_skew_is_accepted(small) -> None:
    frames = small
    events = frames.events.copy()
    events.loc[:9, "timestamp"] = int(AS_OF.timestamp()) + 60  # 1 min ahead < future_skew_s=300
    outcome = validate_batch(events, frames.items, source="m", as_of=AS_OF, config=ML100K_GATE)
    assert outcome.passed and outcome.rows_quarantined == 0


@pytest.mark.parametrize(("n_bad", "stops"), [(50, False), (2000, True)])
def test_unknown_event_type_quarantined_or_stops_over_threshold(small, n_bad: int, stops: bool) -> None:
    frames = small
    events = frames.events.copy()
    events.loc[: n_bad - 1, "event_type"] = "hover"  # 0.25% quarantined; 10% stops
    outcome = validate_batch(events, frames.items, source="m", as_of=AS_OF, config=ML100K_GATE)
    assert outcome.stopped is stops
    assert outcome.rows_quarantined == n_bad
    q = outcome.quarantined
    assert q is not None and set(q["check"]) == {"contract.event_type"} and set(q["event_type"]) == {"hover"}


def test_duplicate_event_ids_exact_deduplicated_conflicting_quarantined(ml100k_path: Path) -> None:
    frames = read_source("movielens-100k", ml100k_path)
    events = frames.events.copy()
    events.insert(0, "event_id", [f"e{i}" for i in range(len(events))])
    exact = events.iloc[100:130]  # replayed: same id, same content
    conflict = events.iloc[200:210].assign(value=1)  # same id, different rating
    conflict = conflict[events.iloc[200:210]["value"].to_numpy() != 1]
    batch = pd.concat([events, exact, conflict], ignore_index=True)
    outcome = validate_batch(batch, frames.items, source="m", as_of=AS_OF, config=ML100K_GATE)
    assert outcome.passed
    assert outcome.rows_deduplicated == 30
    assert outcome.rows_quarantined == 2 * len(conflict)  # both versions: which one is true is unknown
    assert outcome.rows_ok == 100_000 - len(conflict)
    assert outcome.events is not None and outcome.events["event_id"].is_unique
    q = outcome.quarantined
    assert q is not None and set(q.loc[q["action"] == "quarantined", "event_id"]) == set(conflict["event_id"])


def test_empty_batch_stops(small, tmp_path: Path) -> None:
    frames = small
    outcome = validate_batch(
        frames.events.iloc[:0], frames.items, source="m", as_of=AS_OF, config=ML100K_GATE
    )
    assert outcome.stopped
    assert any(f.startswith("events.expect_table_row_count_to_be_between") for f in outcome.failing)


def test_bot_user_stops_the_batch(small) -> None:
    frames = small
    bot = frames.events.iloc[:1200].assign(user_id=99_999)  # one user, 1200 / 21200 = 5.7% > 5%
    batch = pd.concat([frames.events, bot], ignore_index=True)
    outcome = validate_batch(batch, frames.items, source="m", as_of=AS_OF, config=ML100K_GATE)
    assert outcome.stopped
    assert any(f.startswith("events.expect_column_max_to_be_between(user_share)") for f in outcome.failing)


def test_unknown_items_tolerated_up_to_threshold(small) -> None:
    frames = small
    events = frames.events.copy()
    events.loc[:199, "item_id"] = 50_000  # 1% new items: feedback on items not yet in the catalogue
    assert validate_batch(events, frames.items, source="m", as_of=AS_OF, config=ML100K_GATE).passed
    events.loc[:1999, "item_id"] = 50_000  # 10%: catalogue and events disagree
    outcome = validate_batch(events, frames.items, source="m", as_of=AS_OF, config=ML100K_GATE)
    assert outcome.stopped
    assert any("expect_column_values_to_be_in_set(item_id)" in f for f in outcome.failing)
