"""`recloop monitor --json` without a Prefect server: a one-line error on stderr, nothing on stdout, exit 1."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_monitor_without_a_prefect_server_fails_cleanly(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import app
    from recloop.settings import get_settings

    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path))
    api = f"http://127.0.0.1:{_free_port()}/api"
    monkeypatch.setenv("RECLOOP_PREFECT_API_URL", api)
    monkeypatch.setenv("PREFECT_API_URL", api)  # the command points Prefect here; monkeypatch restores it after
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["monitor", "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "does not answer" in result.stderr and "recloop up" in result.stderr and "Traceback" not in result.stderr
