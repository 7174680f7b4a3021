"""Bad input: faulty copies of the real MovieLens files each fail with an error naming file/line/column,
and the lake stays untouched."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from recloop.ingest import ingest_source
from recloop.lake import Lake
from recloop.sources import SourceError


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("README*", "PROVENANCE*", "links.csv"))
    return dest


def _edit_line(path: Path, line_no: int, fn: Callable[[str], str], encoding: str = "utf-8") -> None:
    lines = path.read_text(encoding=encoding).splitlines(keepends=True)
    lines[line_no - 1] = fn(lines[line_no - 1])
    path.write_text("".join(lines), encoding=encoding, newline="")


def _assert_fails_cleanly(
    tmp_path: Path, source: str, folder: Path, pattern: str
) -> SourceError | ValueError:
    lake_root = tmp_path / "lake"
    with pytest.raises((SourceError, ValueError), match=pattern) as info:
        ingest_source(source, folder, lake_root)
    lake = Lake(lake_root)
    assert lake.batches() == [] and lake.events().empty and lake.watermark() is None
    assert not (lake_root / "events").exists()
    return info.value


def _field(i: int, value: str) -> Callable[[str], str]:
    def fn(line: str) -> str:
        parts = line.rstrip("\n").split("\t")
        parts[i] = value
        return "\t".join(parts) + "\n"

    return fn


@pytest.fixture()
def ml100k_copy(tmp_path: Path, ml100k_path: Path) -> Path:
    return _copy(ml100k_path, tmp_path / "ml-100k")


@pytest.fixture()
def latest_copy(tmp_path: Path, ml_latest_small_path: Path) -> Path:
    return _copy(ml_latest_small_path, tmp_path / "ml-latest-small")


def test_missing_column_in_csv_header(tmp_path: Path, latest_copy: Path) -> None:
    _edit_line(latest_copy / "ratings.csv", 1, lambda _: "userId,movieId,score,timestamp\r\n")
    err = _assert_fails_cleanly(
        tmp_path, "movielens-latest", latest_copy, r"ratings\.csv, line 1, column 'rating'"
    )
    assert "missing column" in str(err)


def test_missing_column_in_headerless_file(tmp_path: Path, ml100k_copy: Path) -> None:
    data = ml100k_copy / "u.data"
    data.write_text("".join(line.rsplit("\t", 1)[0] + "\n" for line in data.read_text().splitlines()))
    _assert_fails_cleanly(
        tmp_path, "movielens-100k", ml100k_copy, r"u\.data, line 1: .*missing column 'timestamp'"
    )


def test_non_numeric_rating(tmp_path: Path, ml100k_copy: Path) -> None:
    _edit_line(ml100k_copy / "u.data", 7, _field(2, "four"))
    err = _assert_fails_cleanly(tmp_path, "movielens-100k", ml100k_copy, r"u\.data, line 7, column 'value'")
    assert "must be numeric" in str(err) and "'four'" in str(err)


def test_unparsable_timestamp(tmp_path: Path, latest_copy: Path) -> None:
    _edit_line(latest_copy / "ratings.csv", 42, lambda line: line.rsplit(",", 1)[0] + ",yesterday\r\n")
    err = _assert_fails_cleanly(
        tmp_path, "movielens-latest", latest_copy, r"ratings\.csv, line 42, column 'timestamp'"
    )
    assert "unparsable timestamp" in str(err) and "'yesterday'" in str(err)


def test_empty_file(tmp_path: Path, ml100k_copy: Path) -> None:
    (ml100k_copy / "u.data").write_text("")
    _assert_fails_cleanly(tmp_path, "movielens-100k", ml100k_copy, r"u\.data: file is empty")


def test_header_only_file(tmp_path: Path, latest_copy: Path) -> None:
    (latest_copy / "ratings.csv").write_text("userId,movieId,rating,timestamp\r\n")
    _assert_fails_cleanly(tmp_path, "movielens-latest", latest_copy, r"ratings\.csv: file has no data rows")


def test_wrong_separator(tmp_path: Path, ml100k_copy: Path) -> None:
    data = ml100k_copy / "u.data"
    data.write_text(data.read_text().replace("\t", ","))
    err = _assert_fails_cleanly(tmp_path, "movielens-100k", ml100k_copy, r"u\.data, line 1: expected 4")
    assert "wrong separator" in str(err) and "','" in str(err)


def test_wrong_separator_in_csv(tmp_path: Path, latest_copy: Path) -> None:
    ratings = latest_copy / "ratings.csv"
    ratings.write_text(ratings.read_text().replace(",", ";"))
    err = _assert_fails_cleanly(
        tmp_path, "movielens-latest", latest_copy, r"ratings\.csv, line 1, column 'userId'"
    )
    assert "wrong separator" in str(err)


def test_same_event_id_twice_with_different_content(tmp_path: Path, latest_copy: Path) -> None:
    ratings = latest_copy / "ratings.csv"
    lines = ratings.read_text().splitlines()
    rows = ["event_id," + lines[0]] + [f"e{k}," + line for k, line in enumerate(lines[1:50])]
    rows[30] = "e5," + rows[30].split(",", 1)[1]  # line 31 reuses e5 (line 7) for another rating
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    cols = {"userId": "user_id", "movieId": "item_id", "rating": "value"}
    with pytest.raises(
        SourceError, match=r"events\.csv, line 31, column 'event_id': event_id 'e5' .*first at line 7"
    ):
        ingest_source("csv", tmp_path / "events.csv", tmp_path / "lake", columns=cols)
    assert Lake(tmp_path / "lake").batches() == []
    # the identical duplicate is fine: dropped, not an error
    rows[30] = rows[6]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    report = ingest_source("csv", tmp_path / "events.csv", tmp_path / "lake", columns=cols)
    assert report.new_events == 48 and report.duplicates_dropped == 1


@pytest.mark.parametrize(
    ("value", "rule"),
    [("-5", "numeric ids must be >= 0"), ("", "must not be null"), ("3.5", "must be whole")],
)
def test_negative_nan_or_fractional_user_id(tmp_path: Path, ml100k_copy: Path, value: str, rule: str) -> None:
    _edit_line(ml100k_copy / "u.data", 1000, _field(0, value))
    err = _assert_fails_cleanly(
        tmp_path, "movielens-100k", ml100k_copy, r"u\.data, line 1000, column 'user_id'"
    )
    assert rule in str(err)


def test_negative_item_id_in_csv(tmp_path: Path, latest_copy: Path) -> None:
    _edit_line(latest_copy / "ratings.csv", 3, lambda line: "1,-3," + line.split(",", 2)[2])
    _assert_fails_cleanly(
        tmp_path, "movielens-latest", latest_copy, r"ratings\.csv, line 3, column 'item_id'.*>= 0"
    )


def test_non_utf8_file_read_as_utf8(tmp_path: Path, latest_copy: Path) -> None:
    movies = latest_copy / "movies.csv"
    movies.write_bytes(movies.read_text(encoding="utf-8").encode("latin-1", errors="replace"))
    err = _assert_fails_cleanly(
        tmp_path, "movielens-latest", latest_copy, r"movies\.csv, line \d+: byte \d+ is not valid utf-8"
    )
    assert "latin-1" in str(err)


def test_latin1_file_is_read_when_declared(tmp_path: Path, ml100k_copy: Path) -> None:
    """u.item is latin-1 by definition; reading it as utf-8 would fail, the source does not."""
    with pytest.raises(UnicodeDecodeError):
        (ml100k_copy / "u.item").read_text(encoding="utf-8")
    assert ingest_source("movielens-100k", ml100k_copy, tmp_path / "lake").items == 1682
