"""Bad input on the real ingest path (``flows.ingest.validated_ingest``, what ``recloop ingest`` runs).

Faulty copies of the real MovieLens files. A file that cannot be read as its format promises (missing
column, empty file, wrong separator, wrong encoding) stops the whole batch with a ``DataValidationError``
naming the file, line and column, and the lake stays untouched. A bad row (an id, rating or timestamp
that breaks a rule of ``recloop.contract``) is quarantined under ``<home>/quarantine/<batch>/`` with its
raw value and a reason naming the column and the rule, and every other row reaches the lake.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from flows.ingest import validated_ingest
from recloop.contract import RULE_FRACTIONAL, RULE_NEGATIVE, RULE_NULL, RULE_TIMESTAMP, RULE_VALUE
from recloop.lake import Lake
from recloop.quarantine import DataValidationError
from recloop.settings import get_settings
from recloop.sources import SourceError

BATCH = "bad-input"
#: File line of the first event row (row 0): u.data has no header, ratings.csv / events.csv have one.
FIRST_LINE = {"movielens-100k": 1, "movielens-latest": 2, "csv": 2}
CSV_COLUMNS = {"userId": "user_id", "movieId": "item_id", "rating": "value"}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("README*", "PROVENANCE*", "links.csv"))
    return dest


def _edit_line(path: Path, line_no: int, fn: Callable[[str], str], encoding: str = "utf-8") -> None:
    lines = path.read_text(encoding=encoding).splitlines(keepends=True)
    lines[line_no - 1] = fn(lines[line_no - 1])
    path.write_text("".join(lines), encoding=encoding, newline="")


def _field(i: int, value: str) -> Callable[[str], str]:
    def fn(line: str) -> str:
        parts = line.rstrip("\n").split("\t")
        parts[i] = value
        return "\t".join(parts) + "\n"

    return fn


def _assert_lake_untouched() -> None:
    lake_root = get_settings().lake_path
    lake = Lake(lake_root)
    assert lake.batches() == [] and lake.events().empty and lake.watermark() is None
    assert not (lake_root / "events").exists()


def _assert_stops_cleanly(source: str, path: Path, pattern: str, **options: object) -> DataValidationError:
    """The batch stops with a ``DataValidationError`` matching ``pattern``; nothing reaches the lake."""
    with pytest.raises(DataValidationError, match=pattern) as info:
        validated_ingest(source, str(path), batch_id=BATCH, **options)
    _assert_lake_untouched()
    return info.value


def _read_error(err: DataValidationError, file: str, line: int | None) -> SourceError:
    """The reader's ``SourceError`` behind a structural stop, naming ``file`` and ``line``."""
    cause = err.__cause__
    assert isinstance(cause, SourceError)
    assert Path(cause.file).name == file and cause.line == line
    assert err.failing == [f"source.read: {cause}"]
    return cause


def _pairs(events: pd.DataFrame) -> list[tuple[str, str]]:
    return list(zip(events["user_id"].astype(str), events["item_id"].astype(str), strict=True))


def _assert_quarantines_one_row(
    home: Path,
    source: str,
    path: Path,
    clean: list[tuple[str, str]],
    *,
    line: int,
    column: str,
    rule: str,
    raw: str,
) -> None:
    """Exactly the row at file ``line`` is quarantined (``column`` broke ``rule``; its raw value kept);
    the batch passes and every other row of the file reaches the lake.

    ``clean``: the (user_id, item_id) pairs of the unedited file, in file order (unique in MovieLens).
    """
    report = validated_ingest(source, str(path), batch_id=BATCH)
    assert report["rows_quarantined"] == 1 and report["bad_share"] == pytest.approx(1 / len(clean))
    assert report["new_events"] == report["total_events"] == len(clean) - 1
    out = home / "quarantine" / BATCH
    outcome = json.loads((out / "result.json").read_text())["outcome"]
    assert outcome["passed"] and outcome["rows_quarantined"] == 1
    rows = pd.read_parquet(out / "quarantined.parquet")
    assert len(rows) == 1
    bad = rows.iloc[0]
    row = line - FIRST_LINE[source]
    assert bad["row"] == row and bad["action"] == "quarantined"
    assert bad["check"] == f"contract.{column}" and bad["reason"] == f"{column}: {rule}"
    assert pd.isna(bad[column]) if raw == "" else str(bad[column]) == raw, bad[column]  # the raw value
    lake_pairs = _pairs(Lake(get_settings().lake_path).events())
    assert len(lake_pairs) == len(clean) - 1
    assert set(lake_pairs) == set(clean) - {clean[row]}


@pytest.fixture()
def ml100k_copy(tmp_path: Path, ml100k_path: Path) -> Path:
    return _copy(ml100k_path, tmp_path / "ml-100k")


@pytest.fixture()
def latest_copy(tmp_path: Path, ml_latest_small_path: Path) -> Path:
    return _copy(ml_latest_small_path, tmp_path / "ml-latest-small")


@pytest.fixture(scope="module")
def ml100k_pairs(ml100k_path: Path) -> list[tuple[str, str]]:
    data = pd.read_csv(ml100k_path / "u.data", sep="\t", header=None, names=["user_id", "item_id", "v", "t"])
    return _pairs(data)


@pytest.fixture(scope="module")
def latest_pairs(ml_latest_small_path: Path) -> list[tuple[str, str]]:
    ratings = pd.read_csv(ml_latest_small_path / "ratings.csv").rename(columns=CSV_COLUMNS)
    return _pairs(ratings)


# ---- structural faults: the whole batch stops, the lake stays untouched ------------------------------


def test_missing_column_in_csv_header(recloop_home: Path, latest_copy: Path) -> None:
    _edit_line(latest_copy / "ratings.csv", 1, lambda _: "userId,movieId,score,timestamp\r\n")
    err = _assert_stops_cleanly(
        "movielens-latest", latest_copy, r"source\.read: .*ratings\.csv, line 1, column 'rating'"
    )
    assert "missing column 'rating'" in str(err)
    assert _read_error(err, "ratings.csv", 1).column == "rating"


def test_missing_column_in_headerless_file(recloop_home: Path, ml100k_copy: Path) -> None:
    data = ml100k_copy / "u.data"
    data.write_text("".join(line.rsplit("\t", 1)[0] + "\n" for line in data.read_text().splitlines()))
    err = _assert_stops_cleanly("movielens-100k", ml100k_copy, r"u\.data, line 1: .*missing column 'timestamp'")
    _read_error(err, "u.data", 1)


def test_empty_file(recloop_home: Path, ml100k_copy: Path) -> None:
    (ml100k_copy / "u.data").write_text("")
    err = _assert_stops_cleanly("movielens-100k", ml100k_copy, r"u\.data: file is empty")
    _read_error(err, "u.data", None)


def test_header_only_file(recloop_home: Path, latest_copy: Path) -> None:
    (latest_copy / "ratings.csv").write_text("userId,movieId,rating,timestamp\r\n")
    err = _assert_stops_cleanly("movielens-latest", latest_copy, r"ratings\.csv: file has no data rows")
    _read_error(err, "ratings.csv", None)


def test_wrong_separator(recloop_home: Path, ml100k_copy: Path) -> None:
    data = ml100k_copy / "u.data"
    data.write_text(data.read_text().replace("\t", ","))
    err = _assert_stops_cleanly("movielens-100k", ml100k_copy, r"u\.data, line 1: expected 4")
    assert "wrong separator" in str(err) and "','" in str(err)
    _read_error(err, "u.data", 1)


def test_wrong_separator_in_csv(recloop_home: Path, latest_copy: Path) -> None:
    ratings = latest_copy / "ratings.csv"
    ratings.write_text(ratings.read_text().replace(",", ";"))
    err = _assert_stops_cleanly("movielens-latest", latest_copy, r"ratings\.csv, line 1, column 'userId'")
    assert "wrong separator" in str(err)
    _read_error(err, "ratings.csv", 1)


def test_non_utf8_file_read_as_utf8(recloop_home: Path, latest_copy: Path) -> None:
    movies = latest_copy / "movies.csv"
    text = movies.read_text(encoding="utf-8")
    movies.write_bytes(text.encode("latin-1", errors="replace"))
    first_accent = next(i for i, ch in enumerate(text) if ord(ch) > 127)
    line = text.count("\n", 0, first_accent) + 1
    err = _assert_stops_cleanly(
        "movielens-latest", latest_copy, rf"movies\.csv, line {line}: byte \d+ is not valid utf-8"
    )
    assert "latin-1" in str(err)
    _read_error(err, "movies.csv", line)


# ---- conflicting / repeated event ids (csv source with an event_id column) ------------------------------


def _events_csv(tmp_path: Path, ml_latest_small_path: Path, line_31: Callable[[list[str]], str]) -> Path:
    """The first 49 ratings of ml-latest-small with ids e0..e48, line 31 (id e29) replaced by ``line_31``."""
    lines = (ml_latest_small_path / "ratings.csv").read_text().splitlines()
    rows = ["event_id," + lines[0]] + [f"e{k}," + line for k, line in enumerate(lines[1:50])]
    rows[30] = line_31(rows)
    path = tmp_path / "events.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _conflict(rows: list[str]) -> str:
    return "e5," + rows[30].split(",", 1)[1]  # line 31 reuses e5 (line 7) for another rating


def _assert_conflict_quarantined(home: Path) -> None:
    rows = pd.read_parquet(home / "quarantine" / BATCH / "quarantined.parquet")
    # both rows: which of the two is true is unknown; lines 7 and 31 are rows 5 and 29
    assert rows["row"].tolist() == [7 - 2, 31 - 2] and rows["event_id"].tolist() == ["e5", "e5"]
    assert set(rows["check"]) == {"duplicate.event_id"} and set(rows["action"]) == {"quarantined"}
    assert set(rows["reason"]) == {"event_id='e5' repeated with different content"}


def test_same_event_id_twice_with_different_content_stops_a_small_batch(
    recloop_home: Path, tmp_path: Path, ml_latest_small_path: Path
) -> None:
    path = _events_csv(tmp_path, ml_latest_small_path, _conflict)
    err = _assert_stops_cleanly("csv", path, r"bad_row_share=0\.0408 > max_bad_row_share=0\.01", columns=CSV_COLUMNS)
    assert err.failing == ["bad_row_share=0.0408 > max_bad_row_share=0.01"]
    _assert_conflict_quarantined(recloop_home)


def test_same_event_id_twice_with_different_content_quarantines_both_rows(
    recloop_home: Path, tmp_path: Path, ml_latest_small_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECLOOP_MAX_BAD_ROW_SHARE", "0.05")  # 2 bad rows of 49 are within tolerance
    get_settings.cache_clear()
    path = _events_csv(tmp_path, ml_latest_small_path, _conflict)
    report = validated_ingest("csv", str(path), batch_id=BATCH, columns=CSV_COLUMNS)
    assert report["rows_quarantined"] == 2 and report["new_events"] == 47
    _assert_conflict_quarantined(recloop_home)
    lake_ids = set(Lake(get_settings().lake_path).events()["event_id"])
    assert lake_ids == {f"e{k}" for k in range(49)} - {"e5", "e29"}


def test_identical_duplicate_row_is_deduplicated(
    recloop_home: Path, tmp_path: Path, ml_latest_small_path: Path
) -> None:
    path = _events_csv(tmp_path, ml_latest_small_path, lambda rows: rows[6])  # line 31 repeats line 7
    report = validated_ingest("csv", str(path), batch_id=BATCH, columns=CSV_COLUMNS)
    # dropped by the gate (recorded, not counted as bad), so the lake sees 48 distinct events
    assert report["new_events"] == 48 and report["rows_quarantined"] == 0
    out = recloop_home / "quarantine" / BATCH
    assert json.loads((out / "result.json").read_text())["outcome"]["rows_deduplicated"] == 1
    rows = pd.read_parquet(out / "quarantined.parquet")
    assert rows["row"].tolist() == [31 - 2] and rows["action"].tolist() == ["deduplicated"]
    assert rows["reason"].tolist() == ["exact repeat of event_id='e5'"]


# ---- row-level faults: exactly the bad row is quarantined, the rest reach the lake ------------------


def test_non_numeric_rating(recloop_home: Path, ml100k_copy: Path, ml100k_pairs: list[tuple[str, str]]) -> None:
    _edit_line(ml100k_copy / "u.data", 7, _field(2, "four"))
    _assert_quarantines_one_row(
        recloop_home, "movielens-100k", ml100k_copy, ml100k_pairs,
        line=7, column="value", rule=RULE_VALUE, raw="four",
    )  # fmt: skip


def test_unparsable_timestamp(recloop_home: Path, latest_copy: Path, latest_pairs: list[tuple[str, str]]) -> None:
    _edit_line(latest_copy / "ratings.csv", 42, lambda line: line.rsplit(",", 1)[0] + ",yesterday\r\n")
    _assert_quarantines_one_row(
        recloop_home, "movielens-latest", latest_copy, latest_pairs,
        line=42, column="timestamp", rule=RULE_TIMESTAMP, raw="yesterday",
    )  # fmt: skip


@pytest.mark.parametrize(("value", "rule"), [("-5", RULE_NEGATIVE), ("", RULE_NULL), ("3.5", RULE_FRACTIONAL)])
def test_negative_nan_or_fractional_user_id(
    recloop_home: Path, ml100k_copy: Path, ml100k_pairs: list[tuple[str, str]], value: str, rule: str
) -> None:
    _edit_line(ml100k_copy / "u.data", 1000, _field(0, value))
    _assert_quarantines_one_row(
        recloop_home, "movielens-100k", ml100k_copy, ml100k_pairs,
        line=1000, column="user_id", rule=rule, raw=value,
    )  # fmt: skip


def test_negative_item_id_in_csv(recloop_home: Path, latest_copy: Path, latest_pairs: list[tuple[str, str]]) -> None:
    _edit_line(latest_copy / "ratings.csv", 3, lambda line: "1,-3," + line.split(",", 2)[2])
    _assert_quarantines_one_row(
        recloop_home, "movielens-latest", latest_copy, latest_pairs,
        line=3, column="item_id", rule=RULE_NEGATIVE, raw="-3",
    )  # fmt: skip


# ---- clean input ---------------------------------------------------------------------------------


def test_latin1_file_is_read_when_declared_and_reingest_adds_nothing(recloop_home: Path, ml100k_path: Path) -> None:
    """u.item is latin-1 by definition; reading it as utf-8 would fail, the source does not."""
    with pytest.raises(UnicodeDecodeError):
        (ml100k_path / "u.item").read_text(encoding="utf-8")
    first = validated_ingest("movielens-100k", str(ml100k_path))
    assert first["items"] == 1682 and first["new_events"] == 100_000 and first["rows_quarantined"] == 0
    lake = Lake(get_settings().lake_path)
    titles = lake.items().set_index("item_id")["title"]
    assert titles["543"] == "Misérables, Les (1995)"
    again = validated_ingest("movielens-100k", str(ml100k_path))
    assert again["new_events"] == 0 and again["duplicates_dropped"] == 100_000
    assert again["new_items"] == 0 and again["new_users"] == 0
    assert again["total_events"] == 100_000 and len(lake.events()) == 100_000
