"""Start and stop the local platform processes (`recloop up` / `recloop down`).

Each service runs as a detached child process bound to loopback, with its PID file and log under
``<home>/run/``. Start-up waits for the service's health URL, so when ``up`` returns the UIs answer.

Services (embedded default profile):

| name     | what                                   | health URL                         |
|----------|----------------------------------------|------------------------------------|
| prefect  | Prefect server (SQLite under home)     | http://127.0.0.1:4200/api/health   |
| mlflow   | MLflow tracking server + UI            | http://127.0.0.1:5000/health       |
| serving  | BentoML ``Recommender`` service        | http://127.0.0.1:3000/readyz       |
| runner   | Prefect deployment runner (the loop)   | (process alive)                    |
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from recloop.settings import TELEMETRY_ENV, Settings
from registry.tracking import SERVER_ENV, server_command

logger = logging.getLogger(__name__)

SERVICE_ORDER: tuple[str, ...] = ("prefect", "mlflow", "serving", "runner")


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service: argv, extra environment, health URL (None = alive is enough)."""

    name: str
    argv: list[str]
    health_url: str | None
    start_timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


def _bin(name: str) -> str:
    """The console script ``name`` of the current virtualenv."""
    return str(Path(sys.executable).with_name(name))


def service_env(settings: Settings) -> dict[str, str]:
    """Environment shared by every child: telemetry off, Prefect API and home set."""
    env = dict(os.environ)
    # Importing Feast points prometheus at a temp dir it deletes on exit; children must not inherit it.
    env.pop("PROMETHEUS_MULTIPROCESS_DIR", None)
    for key, value in TELEMETRY_ENV.items():
        env.setdefault(key, value)
    env["RECLOOP_HOME"] = str(settings.home)
    env["PREFECT_HOME"] = str(settings.home / "prefect")
    env["PREFECT_API_URL"] = settings.prefect_api_url
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    env.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    return env


def specs(settings: Settings) -> dict[str, ServiceSpec]:
    """The service table for ``settings``."""
    home = settings.home
    return {
        "prefect": ServiceSpec(
            "prefect",
            [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(settings.prefect_port)],
            f"http://127.0.0.1:{settings.prefect_port}/api/health",
            90.0,
        ),
        "mlflow": ServiceSpec(
            "mlflow",
            server_command(settings),
            f"http://127.0.0.1:{settings.mlflow_port}/health",
            120.0,
            dict(SERVER_ENV),
        ),
        "serving": ServiceSpec(
            "serving",
            [
                _bin("bentoml"), "serve", "serving.service:Recommender",
                "--host", settings.serve_host, "--port", str(settings.serve_port),
                "--working-dir", str(Path.cwd()),
            ],
            f"http://{settings.serve_host}:{settings.serve_port}/readyz",
            180.0,
            {"BENTOML_HOME": str(home / "bentoml")},
        ),
        "runner": ServiceSpec("runner", [sys.executable, "-m", "flows.loop", "serve"], None, 10.0),
    }


def _pid_path(settings: Settings, name: str) -> Path:
    return settings.home / "run" / f"{name}.pid"


def log_path(settings: Settings, name: str) -> Path:
    """Where service ``name`` writes its stdout/stderr."""
    return settings.home / "run" / f"{name}.log"


def running_pid(settings: Settings, name: str) -> int | None:
    """The PID of service ``name`` if its PID file names a live process, else None."""
    path = _pid_path(settings, name)
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError):
        return None
    return None if _is_zombie(pid) else pid


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code < 500
    except httpx.HTTPError:
        return False


def spawn(settings: Settings, name: str) -> int:
    """Start service ``name`` in the background without waiting (no-op if it runs).

    Returns:
        The PID of the service process.
    Raises:
        ValueError: unknown service name (lists the allowed ones).
    """
    table = specs(settings)
    if name not in table:
        raise ValueError(f"unknown service {name!r}; expected one of {list(table)}")
    pid = running_pid(settings, name)
    if pid is not None:
        return pid
    spec = table[name]
    (settings.home / "run").mkdir(parents=True, exist_ok=True)
    env = service_env(settings) | spec.env
    with log_path(settings, name).open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - argv built from our own table
            spec.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
    _pid_path(settings, name).write_text(str(proc.pid))
    return proc.pid


def wait_healthy(settings: Settings, name: str, timeout_s: float | None = None) -> int:
    """Wait until service ``name`` answers its health URL (or, without one, stays alive for 1 s).

    Returns:
        The PID.
    Raises:
        RuntimeError: the process is not running or exited, or it was not healthy within the timeout
            (``timeout_s``, default the service's own); the message names the log file.
    """
    spec = specs(settings)[name]
    log = log_path(settings, name)

    def healthy_pid() -> int | None:
        """The PID once the service is healthy, None while it is not yet; raises if it is not running."""
        pid = running_pid(settings, name)
        if pid is None:
            raise RuntimeError(f"service {name} is not running; see {log}")
        return pid if spec.health_url is None or _healthy(spec.health_url) else None

    limit_s = timeout_s if timeout_s is not None else spec.start_timeout_s
    if spec.health_url is None:
        time.sleep(1.0)
    poll = Retrying(stop=stop_after_delay(limit_s), wait=wait_fixed(0.5),
                    retry=retry_if_result(lambda pid: pid is None))
    try:
        pid = poll(healthy_pid)
    except RetryError:
        raise RuntimeError(f"service {name} not healthy after {limit_s:.0f} s; see {log}") from None
    logger.info("service up name=%s pid=%d", name, pid)
    return pid


def _exited(pid: int) -> bool:
    """Whether process ``pid`` is gone (signal 0 finds no such process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return False


def start(settings: Settings, name: str) -> int:
    """Start service ``name`` (no-op if running) and wait until it is healthy.

    Returns:
        The PID of the service process.
    Raises:
        ValueError: unknown service name.
        RuntimeError: the process exited or did not become healthy within its timeout (it is stopped).
    """
    spawn(settings, name)
    try:
        return wait_healthy(settings, name)
    except RuntimeError:
        stop(settings, name)
        raise


def stop(settings: Settings, name: str, timeout_s: float = 15.0) -> bool:
    """Stop service ``name`` (its whole process group). Returns True if something was stopped."""
    pid = running_pid(settings, name)
    path = _pid_path(settings, name)
    if pid is None:
        path.unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    wait_exit = Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(0.2),
                         retry=retry_if_result(lambda exited: not exited))
    try:
        wait_exit(_exited, pid)
    except RetryError:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    path.unlink(missing_ok=True)
    logger.info("service down name=%s pid=%d", name, pid)
    return True


def urls(settings: Settings) -> dict[str, str]:
    """The user-facing addresses of the UIs and the endpoint."""
    return {
        "prefect_ui": f"http://127.0.0.1:{settings.prefect_port}",
        "mlflow_ui": f"http://127.0.0.1:{settings.mlflow_port}",
        "recommender": f"http://{settings.serve_host}:{settings.serve_port}",
    }
