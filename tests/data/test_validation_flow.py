"""The Prefect validate flow (under prefect_test_harness) and the `recloop validate` command."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app
from flows.validate import validate_flow
from recloop.quarantine import DataValidationError

AS_OF = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def _copy_ml100k(src: Path, dst: Path, column: int, every: int, value: str) -> Path:
    """Copy ml-100k into ``dst`` with field ``column`` of every ``every``-th u.data row set to ``value``."""
    dst.mkdir(parents=True)
    for name in ("u.item", "u.user", "u.genre"):
        shutil.copy(src / name, dst / name)
    data = pd.read_csv(src / "u.data", sep="\t", header=None, dtype=str, keep_default_na=False)
    data.loc[::every, column] = value
    data.to_csv(dst / "u.data", sep="\t", header=False, index=False)
    return dst


def test_flow_quarantines_bad_rows_and_writes_results_and_data_docs(
    prefect_harness: None, recloop_home: Path, ml100k_path: Path, tmp_path: Path
) -> None:
    path = _copy_ml100k(ml100k_path, tmp_path / "ml", column=2, every=200, value="7")
    outcome = validate_flow("movielens-100k", str(path), batch_id="b1/rating7", as_of=AS_OF)
    assert outcome.passed and outcome.rows_quarantined == 500 and outcome.rows_ok == 99_500
    batch_dir = recloop_home / "quarantine" / "b1_rating7"
    rows = pd.read_parquet(batch_dir / "quarantined.parquet")
    assert len(rows) == 500 and rows["row"].tolist() == list(range(0, 100_000, 200))
    assert rows["reason"].str.startswith("value=7.0 outside").all()
    result = json.loads((batch_dir / "result.json").read_text())
    assert result["outcome"]["rows_quarantined"] == 500
    assert result["gx_results"]["events"]["success"] is False  # the range expectation saw the 500 rows
    assert Path(outcome.data_docs_path) == recloop_home / "data_docs" / "index.html"
    assert Path(outcome.data_docs_path).exists()
    assert list((recloop_home / "data_docs" / "validations" / "events").rglob("*.html"))


def test_flow_stops_on_five_percent_null_user_ids(
    prefect_harness: None, recloop_home: Path, ml100k_path: Path, tmp_path: Path
) -> None:
    path = _copy_ml100k(ml100k_path, tmp_path / "ml", column=0, every=20, value="")
    with pytest.raises(DataValidationError, match=r"bad_row_share=0\.0500") as err:
        validate_flow("movielens-100k", str(path), batch_id="nulls", as_of=AS_OF)
    assert err.value.failing == ["bad_row_share=0.0500 > max_bad_row_share=0.01"]
    rows = pd.read_parquet(recloop_home / "quarantine" / "nulls" / "quarantined.parquet")
    assert len(rows) == 5000 and set(rows["check"]) == {"contract.user_id"}


def test_cli_validate_stops_on_renamed_header(
    recloop_home: Path, ml_latest_small_path: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "latest"
    shutil.copytree(ml_latest_small_path, copy)
    ratings = copy / "ratings.csv"
    ratings.write_text(ratings.read_text().replace("userId", "user", 1))
    result = CliRunner().invoke(
        app, ["validate", "--source", "movielens-latest", "--path", str(copy), "--json"]
    )
    assert result.exit_code == 1
    payload = json.loads(result.output)
    assert payload["stopped"] and "missing column 'userId'" in payload["failing"][0]


def test_cli_validate_passes_clean_ml100k(recloop_home: Path, ml100k_path: Path) -> None:
    args = ["validate", "--source", "movielens-100k", "--path", str(ml100k_path), "--json", "--no-data-docs"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["passed"] and payload["rows_ok"] == 100_000 and payload["data_docs_path"] is None
