"""`recloop up` / `recloop down` process management on loopback (real Prefect server)."""

from __future__ import annotations

import socket

import httpx
import pytest

from recloop.settings import get_settings
from supervisor import services


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unknown_service_is_rejected_with_the_allowed_names(recloop_home) -> None:
    with pytest.raises(ValueError, match="prefect"):
        services.spawn(get_settings(), "grafana")


def test_up_writes_pid_and_log_and_down_stops(recloop_home, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    monkeypatch.setenv("RECLOOP_PREFECT_PORT", str(port))
    get_settings.cache_clear()
    settings = get_settings()
    from cli import platform

    try:
        pids = platform.up(settings, ("prefect",))
        assert services.running_pid(settings, "prefect") == pids["prefect"]
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json() is True
        assert services.log_path(settings, "prefect").exists()
        # Starting again is a no-op that returns the same process.
        assert services.spawn(settings, "prefect") == pids["prefect"]
    finally:
        stopped = platform.down(settings)
    assert stopped == ["prefect"]
    assert services.running_pid(settings, "prefect") is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
