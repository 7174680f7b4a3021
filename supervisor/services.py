"""Start and stop the local platform processes (`recloop up` / `recloop down`).

Each service runs as a detached child process bound to loopback, in its own session (process
group), with its PID file and log under ``<home>/run/``. Start-up waits for the service's health URL,
so when ``up`` returns the UIs answer.

Services (embedded default profile):

| name     | what                                   | health URL                         |
|----------|----------------------------------------|------------------------------------|
| prefect  | Prefect server (SQLite under home)     | http://127.0.0.1:4200/api/health   |
| mlflow   | MLflow tracking server + UI            | http://127.0.0.1:5000/health       |
| serving  | BentoML ``Recommender`` service        | http://127.0.0.1:3000/readyz       |
| runner   | Prefect deployment runner (the loop)   | (process alive)                    |

Supervision rules:

- **Clean environment.** Every child gets ``service_env``: the parent's environment without the
  Prometheus multiprocess directories (Feast and BentoML point both spellings at temp dirs their
  process deletes on exit) and without any variable this process set to a path inside a temp dir
  (``clean_environ``), so a child never outlives a directory it was told to use.
- **Ownership.** Every child carries ``RECLOOP_SERVICE=<name>`` and ``RECLOOP_HOME`` in its
  environment, which its own children (BentoML's workers call ``setsid`` and leave the process
  group) inherit. That marker, not the PID file alone, tells which processes are ours.
- **Start.** ``spawn`` refuses a port another process already listens on (``PortInUseError`` names
  its pid and command, and says whether it is a leftover of ours). ``wait_healthy`` accepts the
  health answer only when the listening socket belongs to the started process or a descendant.
- **Stop.** ``stop`` ends the started process tree, its process group and every process that
  carries the service's marker under this home (orphans included), SIGTERM first, SIGKILL after.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from recloop.settings import TELEMETRY_ENV, Settings
from registry.tracking import SERVER_ENV, server_command

logger = logging.getLogger(__name__)

SERVICE_ORDER: tuple[str, ...] = ("prefect", "mlflow", "serving", "runner")

#: Environment marker every supervised process (and its descendants) carries: the service name.
SERVICE_MARKER_ENV = "RECLOOP_SERVICE"
#: Both spellings prometheus_client reads; Feast points them at a temp dir it deletes at exit, and
#: BentoML sets its own for its workers. A child must never inherit either.
PROMETHEUS_ENV: tuple[str, ...] = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")
#: Variables that name the temp directory itself (their inherited values are temp roots).
TEMP_DIR_ENV: tuple[str, ...] = ("TMPDIR", "TEMP", "TMP")
_DEFAULT_TEMP_ROOTS: tuple[str, ...] = ("/tmp", "/var/tmp", "/usr/tmp")  # only compared with, never written
#: This process's environment when this module was imported (fallback where /proc is missing).
_ENV_AT_IMPORT: dict[str, str] = dict(os.environ)
_PATH_RE = re.compile(r"/[^\s:;,\"'=]+")


class PortInUseError(RuntimeError):
    """A service's port is held by a process that is not the one this call started.

    Attributes:
        service: the service name.
        port: the TCP port.
        pid: the listening process (None when it belongs to another user and cannot be seen).
        command: its command line ("" when unknown).
        ours: True when the holder is a leftover of this home's platform (``recloop down`` stops it).
    """

    def __init__(self, message: str, *, service: str, port: int, pid: int | None, command: str, ours: bool):
        super().__init__(message)
        self.service = service
        self.port = port
        self.pid = pid
        self.command = command
        self.ours = ours


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service.

    Attributes:
        name: the service name (also the value of ``RECLOOP_SERVICE`` in its environment).
        argv: the command line.
        health_url: polled until it answers; None = staying alive is enough.
        start_timeout_s: how long start-up may take.
        env: extra environment on top of ``service_env``.
        port: the TCP port the service listens on (None: it listens on none).
        port_setting: the environment variable that moves ``port`` (named in errors).
        signature: argv tokens (exact, or the file name of an element) that identify the service's
            process among this home's processes even without the environment marker.
    """

    name: str
    argv: list[str]
    health_url: str | None
    start_timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    port_setting: str | None = None
    signature: tuple[str, ...] = ()


def _bin(name: str) -> str:
    """The console script ``name`` of the current virtualenv."""
    return str(Path(sys.executable).with_name(name))


def inherited_environ() -> dict[str, str]:
    """The environment this process was started with, before any library changed ``os.environ``.

    Linux keeps the exec-time environment in ``/proc/self/environ`` (``os.environ`` changes do not
    touch it); elsewhere the copy taken when this module was imported is used.

    Returns:
        Variable name → value.
    """
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(_ENV_AT_IMPORT)
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key:
            env[os.fsdecode(key)] = os.fsdecode(value)
    return env


def temp_roots(inherited: Mapping[str, str]) -> list[Path]:
    """The temp directories of this machine: the inherited TMPDIR/TEMP/TMP, the system defaults, gettempdir().

    Args:
        inherited: the environment the process started with (``inherited_environ()``).
    Returns:
        Resolved directories, without duplicates.
    """
    candidates = [inherited[k] for k in TEMP_DIR_ENV if inherited.get(k)]
    candidates += [*_DEFAULT_TEMP_ROOTS, tempfile.gettempdir()]
    roots: list[Path] = []
    for candidate in candidates:
        root = Path(candidate).expanduser().resolve()
        if root not in roots and root != Path(root.anchor):
            roots.append(root)
    return roots


def _is_within(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def temp_path_in(value: str, roots: Iterable[Path], keep: Iterable[Path] = ()) -> str | None:
    """The first path named in ``value`` that lies inside a temp root (and outside every ``keep`` dir).

    Plain paths, ``os.pathsep`` lists and URLs (``file:///tmp/x``) are recognised.

    Args:
        value: an environment variable's value.
        roots: temp directories (``temp_roots``).
        keep: directories whose contents outlive this process (the recloop home).
    Returns:
        The path, or None when ``value`` names none.
    """
    roots, keep = list(roots), list(keep)
    for match in _PATH_RE.findall(value):
        path = Path("/" + match.lstrip("/"))
        try:
            path = path.resolve()
        except (OSError, RuntimeError):
            continue
        if any(_is_within(path, r) for r in roots) and not any(path == k or path.is_relative_to(k) for k in keep):
            return str(path)
    return None


def clean_environ(keep_under: Iterable[Path] = (), environ: Mapping[str, str] | None = None,
                  inherited: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` that is safe to hand to a process that outlives this one.

    Dropped: both Prometheus multiprocess spellings (``PROMETHEUS_ENV``), always; and every variable
    this process set or changed after it started (it differs from ``inherited``) whose value names
    a path inside a temp dir — libraries create such dirs with ``tempfile.mkdtemp`` and delete them
    at exit. A variable that had another value at start-up gets that value back (e.g. a ``TMPDIR`` a
    library moved into its own temp dir). ``RECLOOP_*`` settings and paths inside ``keep_under`` are
    explicit configuration and are kept.

    Args:
        keep_under: directories that outlive this process (the recloop home).
        environ: the environment to clean (default ``os.environ``).
        inherited: the environment this process started with (default ``inherited_environ()``).
    Returns:
        The cleaned environment (a new dict).
    """
    env = dict(os.environ if environ is None else environ)
    start = inherited_environ() if inherited is None else dict(inherited)
    roots = temp_roots(start)
    keep = [Path(p).expanduser().resolve() for p in keep_under]
    for key in PROMETHEUS_ENV:
        env.pop(key, None)
    for key, value in list(env.items()):
        if key.startswith("RECLOOP_") or start.get(key) == value:
            continue
        path = temp_path_in(value, roots, keep)
        if path is None:
            continue
        if key in start and temp_path_in(start[key], roots, keep) is None:
            env[key] = start[key]
            logger.debug("child env: %s=%s points into a temp dir of this process; restored to %s",
                         key, path, start[key])
        else:
            del env[key]
            logger.debug("child env: dropped %s=%s (a temp dir of this process)", key, path)
    return env


def service_env(settings: Settings) -> dict[str, str]:
    """Environment shared by every child: cleaned (``clean_environ``), telemetry off, Prefect API and home set.

    Args:
        settings: the home, the Prefect API URL.
    Returns:
        The environment (the caller adds the service's own ``ServiceSpec.env`` and marker).
    """
    env = clean_environ(keep_under=[settings.home])
    for key, value in TELEMETRY_ENV.items():
        env.setdefault(key, value)
    env.pop(SERVICE_MARKER_ENV, None)
    env["RECLOOP_HOME"] = str(settings.home)
    env["PREFECT_HOME"] = str(settings.home / "prefect")
    env["PREFECT_API_URL"] = settings.prefect_api_url
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    env.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    return env


def specs(settings: Settings) -> dict[str, ServiceSpec]:
    """The service table for ``settings``.

    Returns:
        Service name → ``ServiceSpec`` (argv, health URL, port, signature).
    """
    home = settings.home
    return {
        "prefect": ServiceSpec(
            "prefect",
            [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(settings.prefect_port)],
            f"http://127.0.0.1:{settings.prefect_port}/api/health",
            90.0,
            # Prefect's API allows any origin by default: only its own UI's origin may call it from a browser.
            env={"PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": (
                f"http://127.0.0.1:{settings.prefect_port},http://localhost:{settings.prefect_port}"
            )},
            port=settings.prefect_port, port_setting="RECLOOP_PREFECT_PORT",
            signature=("prefect", "server", "start"),
        ),
        "mlflow": ServiceSpec(
            "mlflow",
            server_command(settings),
            f"http://127.0.0.1:{settings.mlflow_port}/health",
            120.0,
            dict(SERVER_ENV),
            port=settings.mlflow_port, port_setting="RECLOOP_MLFLOW_PORT",
            signature=("mlflow", "server"),
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
            port=settings.serve_port, port_setting="RECLOOP_SERVE_PORT",
            signature=("serving.service:Recommender",),
        ),
        "runner": ServiceSpec("runner", [sys.executable, "-m", "flows.loop", "serve"], None, 10.0,
                              signature=("flows.loop", "serve")),
    }


def _spec(settings: Settings, name: str) -> ServiceSpec:
    table = specs(settings)
    if name not in table:
        raise ValueError(f"unknown service {name!r}; expected one of {list(table)}")
    return table[name]


def _pid_path(settings: Settings, name: str) -> Path:
    return settings.home / "run" / f"{name}.pid"


def log_path(settings: Settings, name: str) -> Path:
    """Where service ``name`` writes its stdout/stderr."""
    return settings.home / "run" / f"{name}.log"


def _recorded_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _proc_env(proc: psutil.Process) -> dict[str, str] | None:
    """The environment ``proc`` started with, or None when it cannot be read (gone, zombie, other user)."""
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _in_home(proc: psutil.Process, settings: Settings) -> bool:
    env = _proc_env(proc)
    return env is not None and env.get("RECLOOP_HOME") == str(settings.home)


def _matches(proc: psutil.Process, spec: ServiceSpec, settings: Settings) -> bool:
    """Whether ``proc`` belongs to service ``spec`` under this home (marker, or signature without one)."""
    env = _proc_env(proc)
    if env is None or env.get("RECLOOP_HOME") != str(settings.home):
        return False
    if SERVICE_MARKER_ENV in env:
        return env[SERVICE_MARKER_ENV] == spec.name
    if not spec.signature:
        return False
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    tokens = set(cmdline) | {Path(arg).name for arg in cmdline}
    return all(token in tokens for token in spec.signature)


def running_pid(settings: Settings, name: str) -> int | None:
    """The PID of service ``name`` if its PID file names a live process of this home.

    A PID that was reused by an unrelated process (its environment does not name this home) and a
    zombie do not count.

    Returns:
        The PID, or None.
    """
    pid = _recorded_pid(_pid_path(settings, name))
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return None
    return pid if _alive(proc) and _in_home(proc, settings) else None


def _describe(pid: int | None) -> str:
    if pid is None:
        return "a process of another user"
    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        command = "?"
    return f"pid {pid} ({command[:200]})"


def port_listeners(port: int) -> list[int | None]:
    """The processes listening on TCP ``port`` (any address), as PIDs; None for one this user cannot see.

    Returns:
        Distinct PIDs, sorted, None last.
    """
    pids: set[int | None] = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            pids.add(conn.pid)
    return sorted(p for p in pids if p is not None) + ([None] if None in pids else [])


def _port_error(settings: Settings, spec: ServiceSpec, pid: int | None, started: int | None = None) -> PortInUseError:
    """The error for port ``spec.port`` held by ``pid`` (``started``: the PID this call started, if any)."""
    proc = _as_process(pid) if pid is not None else None
    env = (_proc_env(proc) if proc is not None else None) or {}
    in_home = env.get("RECLOOP_HOME") == str(settings.home)
    ours = proc is not None and (_matches(proc, spec, settings) or (in_home and SERVICE_MARKER_ENV in env))
    owner = env.get(SERVICE_MARKER_ENV, spec.name)
    try:
        command = " ".join(proc.cmdline()) if proc is not None else ""
    except psutil.Error:
        command = ""
    holder = _describe(pid)
    if started is not None:
        what = (f"service {spec.name}: port {spec.port} answers, but from {holder}, not from the process "
                f"just started (pid {started}) or its children")
    else:
        what = f"service {spec.name}: port {spec.port} is already in use by {holder}"
    if ours:
        hint = f"it is a leftover {owner} process of {settings.home}; `recloop down` stops it"
    else:
        hint = (f"it is not a recloop process of {settings.home}; stop it or choose another port"
                + (f" ({spec.port_setting})" if spec.port_setting else ""))
    return PortInUseError(f"{what}; {hint}", service=spec.name, port=int(spec.port or 0), pid=pid,
                          command=command, ours=ours)


def check_port(settings: Settings, name: str) -> None:
    """Refuse to start service ``name`` while another process listens on its port.

    Raises:
        ValueError: unknown service name.
        PortInUseError: the port is taken; the message names the holder's pid and command and says
            whether it is a leftover of ours (``recloop down`` stops it) or a foreign process.
    """
    spec = _spec(settings, name)
    if spec.port is None:
        return
    listeners = port_listeners(spec.port)
    if listeners:
        raise _port_error(settings, spec, listeners[0])


def spawn(settings: Settings, name: str) -> int:
    """Start service ``name`` in the background without waiting (no-op if it runs).

    The child runs in its own session with ``service_env`` plus the spec's environment and the
    ``RECLOOP_SERVICE`` marker.

    Returns:
        The PID of the service process.
    Raises:
        ValueError: unknown service name (lists the allowed ones).
        PortInUseError: the service's port is already taken by another process.
    """
    spec = _spec(settings, name)
    pid = running_pid(settings, name)
    if pid is not None:
        return pid
    check_port(settings, name)
    (settings.home / "run").mkdir(parents=True, exist_ok=True)
    env = service_env(settings) | spec.env | {SERVICE_MARKER_ENV: name}
    with log_path(settings, name).open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - argv built from our own table
            spec.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
    _pid_path(settings, name).write_text(str(proc.pid))
    logger.info("service spawned name=%s pid=%d", name, proc.pid)
    return proc.pid


def _tree(pid: int) -> set[int]:
    """``pid`` and its live descendants."""
    try:
        proc = psutil.Process(pid)
        return {pid} | {child.pid for child in proc.children(recursive=True)}
    except psutil.Error:
        return {pid}


def verify_listener(settings: Settings, name: str, pid: int) -> None:
    """Check that the socket listening on service ``name``'s port belongs to ``pid`` or a descendant.

    When no listener is visible at all (``/proc`` restricted), a warning is logged and the check passes.

    Raises:
        PortInUseError: another process (an orphan of an earlier start, or a foreign one) listens.
    """
    spec = _spec(settings, name)
    if spec.port is None:
        return
    listeners = port_listeners(spec.port)
    if not listeners:
        logger.warning("service %s answers but no listener on port %d is visible; not verified", name, spec.port)
        return
    tree = _tree(pid)
    strangers = [p for p in listeners if p not in tree]
    if strangers:
        raise _port_error(settings, spec, strangers[0], started=pid)


def wait_healthy(settings: Settings, name: str, timeout_s: float | None = None) -> int:
    """Wait until service ``name`` answers its health URL (or, without one, stays alive for 1 s).

    The answer counts only when it comes from the started process: the port's listening socket
    must belong to it or one of its descendants.

    Returns:
        The PID.
    Raises:
        PortInUseError: the health URL answers from a process that is not the started one (named).
        RuntimeError: the process is not running or exited (the port's holder is named if there is
            one), or it was not healthy within the timeout (``timeout_s``, default the service's own);
            the message names the log file.
    """
    spec = _spec(settings, name)
    log = log_path(settings, name)

    def healthy_pid() -> int | None:
        """The PID once the service is healthy, None while it is not yet; raises if it is not running."""
        pid = running_pid(settings, name)
        if pid is None:
            holders = port_listeners(spec.port) if spec.port is not None else []
            held = f"; port {spec.port} is held by {_describe(holders[0])}" if holders else ""
            raise RuntimeError(f"service {name} is not running{held}; see {log}")
        if spec.health_url is not None and not _healthy(spec.health_url):
            return None
        verify_listener(settings, name, pid)
        return pid

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


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code < 500
    except httpx.HTTPError:
        return False


def start(settings: Settings, name: str) -> int:
    """Start service ``name`` (no-op if running) and wait until it is healthy.

    Returns:
        The PID of the service process.
    Raises:
        ValueError: unknown service name.
        PortInUseError: the port is held by another process (nothing was started).
        RuntimeError: the process exited or did not become healthy within its timeout (it is stopped).
    """
    pid = spawn(settings, name)
    try:
        return wait_healthy(settings, name)
    except RuntimeError:
        _terminate([p for p in (_as_process(q) for q in _tree(pid)) if p is not None], 15.0)
        _pid_path(settings, name).unlink(missing_ok=True)
        raise


def _as_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _protected() -> set[int]:
    """This process and its ancestors: never signalled."""
    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.parents()}


def service_processes(settings: Settings, name: str) -> list[psutil.Process]:
    """Every live process of service ``name`` under this home, orphans included.

    That is the PID file's process with its descendants and process group, plus every process
    whose environment carries ``RECLOOP_SERVICE=name`` and this home (or, without the marker, whose
    command line matches the service's signature). This process and its ancestors are left out.

    Returns:
        The processes, by PID.
    Raises:
        ValueError: unknown service name.
    """
    spec = _spec(settings, name)
    recorded = _recorded_pid(_pid_path(settings, name))
    found: dict[int, psutil.Process] = {}
    root = _as_process(recorded) if recorded is not None else None
    if root is not None and _alive(root) and _in_home(root, settings):
        found[root.pid] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    uid = os.getuid()
    for proc in psutil.process_iter(["pid", "uids"]):
        if proc.pid in found or (proc.info["uids"] is not None and proc.info["uids"].real != uid):
            continue
        in_group = recorded is not None and _pgid(proc.pid) == recorded and _in_home(proc, settings)
        if in_group or _matches(proc, spec, settings):
            found[proc.pid] = proc
    protected = _protected()
    return [p for pid, p in sorted(found.items()) if pid not in protected and _alive(p)]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _terminate(procs: list[psutil.Process], timeout_s: float) -> None:
    """SIGTERM ``procs``, wait up to ``timeout_s`` for them to exit (zombies count as gone), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if _alive(p)]
        for proc in alive:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            for proc in alive:  # reap our own children so they do not linger as zombies
                try:
                    proc.wait(timeout=0)
                except (psutil.Error, ChildProcessError):
                    pass
            alive = [p for p in alive if _alive(p)]
        if not alive:
            return
        if sig == signal.SIGTERM:
            logger.warning("processes %s ignored SIGTERM for %.0f s; killing", [p.pid for p in alive], wait_s)


def stop(settings: Settings, name: str, timeout_s: float = 15.0) -> bool:
    """Stop service ``name``: its process tree, its process group and its orphans under this home.

    Processes are found again after each round (BentoML's arbiter may respawn a worker while it is
    being stopped), for at most three rounds.

    Returns:
        True if something was stopped.
    Raises:
        ValueError: unknown service name.
    """
    stopped: set[int] = set()
    for _ in range(3):
        procs = service_processes(settings, name)
        if not procs:
            break
        _terminate(procs, timeout_s)
        stopped.update(p.pid for p in procs)
    _pid_path(settings, name).unlink(missing_ok=True)
    if stopped:
        logger.info("service down name=%s pids=%s", name, sorted(stopped))
    return bool(stopped)


def urls(settings: Settings) -> dict[str, str]:
    """The user-facing addresses of the UIs and the endpoint."""
    return {
        "prefect_ui": f"http://127.0.0.1:{settings.prefect_port}",
        "mlflow_ui": f"http://127.0.0.1:{settings.mlflow_port}",
        "recommender": f"http://{settings.serve_host}:{settings.serve_port}",
    }
