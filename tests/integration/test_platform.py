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
        tree = {p.pid for p in services.service_processes(settings, "prefect")}
        assert pids["prefect"] in tree
    finally:
        stopped = platform.down(settings)
    assert stopped == ["prefect"]
    assert services.running_pid(settings, "prefect") is None
    assert not services.service_processes(settings, "prefect")  # the whole tree, not just the parent
    assert services.port_listeners(port) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)


# --- supervision: orphans and foreign processes on a service's port (issue 12) ---------------------------------

# A stand-in for `bentoml serve`: the parent binds the port and forks a worker that leaves the process group
# (circus calls setsid for BentoML's workers) and serves on the inherited socket. Killing the parent leaves
# the worker answering, exactly the orphan of a killed BentoML arbiter.
STANDIN = """
import http.server, os, socket, sys, time

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass

sock = socket.create_server(("127.0.0.1", int(sys.argv[1])))
if os.fork() == 0:
    os.setsid()
    server = http.server.HTTPServer(sock.getsockname(), Health, bind_and_activate=False)
    server.socket = sock
    server.serve_forever()
while True:
    time.sleep(1)
"""


@pytest.fixture()
def standin_serving(recloop_home, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """The ``serving`` service replaced by STANDIN on a free port; ``down`` afterwards."""
    import sys

    from cli import platform

    port = _free_port()
    script = tmp_path / "standin_serving.py"
    script.write_text(STANDIN)
    real_specs = services.specs

    def specs(settings):
        table = real_specs(settings)
        table["serving"] = services.ServiceSpec(
            "serving", [sys.executable, str(script), str(port)], f"http://127.0.0.1:{port}/health", 30.0,
            port=port, port_setting="RECLOOP_SERVE_PORT", signature=(script.name,),
        )
        return table

    monkeypatch.setattr(services, "specs", specs)
    monkeypatch.setattr(platform, "has_champion", lambda settings: True)
    settings = get_settings()
    yield settings, port
    platform.down(settings)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_orphan_on_the_port_is_refused_by_up_and_stopped_by_down(standin_serving) -> None:
    import os
    import signal

    import psutil
    from typer.testing import CliRunner

    from cli import platform
    from cli.main import app

    settings, port = standin_serving
    parent = platform.up(settings, ("serving",))["serving"]
    (worker,) = psutil.Process(parent).children()
    assert set(services.port_listeners(port)) <= {parent, worker.pid}
    env = worker.environ()  # the marker reaches the worker although it left the process group
    assert env[services.SERVICE_MARKER_ENV] == "serving" and env["RECLOOP_HOME"] == str(settings.home)
    assert "PROMETHEUS_MULTIPROC_DIR" not in env and "PROMETHEUS_MULTIPROCESS_DIR" not in env

    os.kill(parent, signal.SIGKILL)  # the arbiter dies, the worker keeps serving
    psutil.Process(parent).wait(timeout=10)
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    assert services.running_pid(settings, "serving") is None

    with pytest.raises(services.PortInUseError) as info:
        platform.up(settings, ("serving",))
    assert info.value.pid == worker.pid and info.value.ours
    assert f"pid {worker.pid}" in str(info.value) and "recloop down" in str(info.value)
    result = CliRunner().invoke(app, ["up", "--only", "serving"])
    assert result.exit_code == 1 and f"port {port} is already in use by pid {worker.pid}" in result.output
    assert services.running_pid(settings, "serving") is None  # nothing new was started

    assert platform.down(settings) == ["serving"]
    assert _gone(worker.pid)
    assert services.port_listeners(port) == []
    assert platform.down(settings) == []


def test_up_rejects_a_health_answer_from_a_foreign_process(standin_serving) -> None:
    import subprocess
    import sys

    from cli import platform

    settings, port = standin_serving
    # The started process never listens; a foreign server (no marker, not a child) takes the port meanwhile.
    idle = services.ServiceSpec("serving", [sys.executable, "-c", "import time; time.sleep(120)"],
                                f"http://127.0.0.1:{port}/", 30.0, port=port, port_setting="RECLOOP_SERVE_PORT")
    services_specs = services.specs
    pid = None
    foreign = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(services, "specs", lambda s: {**services_specs(s), "serving": idle})
            pid = services.spawn(settings, "serving")
            foreign = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with pytest.raises(services.PortInUseError) as info:
                services.wait_healthy(settings, "serving", timeout_s=30)
            assert info.value.pid == foreign.pid and not info.value.ours
            assert f"not from the process just started (pid {pid})" in str(info.value)
            assert "not a recloop process" in str(info.value)
            assert platform.down(settings) == ["serving"]
            assert _gone(pid) and foreign.poll() is None  # ours stopped, the foreign one left alone
            with pytest.raises(services.PortInUseError, match=f"pid {foreign.pid}.*RECLOOP_SERVE_PORT"):
                platform.up(settings, ("serving",))
    finally:
        if foreign is not None:
            foreign.kill()
            foreign.wait(timeout=10)
