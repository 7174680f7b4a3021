"""`recloop demo` exits, then the served loop deployment still runs, and `recloop down` leaves nothing (issue 12).

The runner started by `demo` used to inherit the Feast Prometheus temp dir the demo process deletes at
exit, so every later loop run failed in the features stage. Here `recloop demo` runs as its own process
(one training epoch: the gate usually holds that model back, which must end with exit 3 and the gate's
reasons, while a passing model ends with 0), feedback lands in the event log the way the service writes
it, and a run of the ``recloop-loop`` deployment, created through the Prefect API like a UI-started or
scheduled one, must complete. `recloop down` must then stop every process of the platform.

Marked slow (about 5 minutes on 2 shared cores); CI runs it all the same.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from recloop.settings import get_settings
from supervisor import services

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
RECLOOP = str(Path(sys.executable).with_name("recloop"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process(pid: int) -> psutil.Process | None:
    """The live (non-zombie) process ``pid`` with its command line in ``.info``, or None."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        proc.info = {"pid": pid, "cmdline": proc.cmdline()}
        return proc
    except psutil.Error:
        return None


def _ours(home: Path) -> list[psutil.Process]:
    """Live processes whose environment names ``home`` and a supervised service."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get("RECLOOP_HOME") == str(home) and services.SERVICE_MARKER_ENV in env \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture()
def demo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh home and free ports, in this process (settings) and for the `recloop` subprocesses."""
    home = tmp_path / "home"
    values = {
        "RECLOOP_HOME": str(home),
        "RECLOOP_PREFECT_PORT": str(_free_port()),
        "RECLOOP_MLFLOW_PORT": str(_free_port()),
        "RECLOOP_SERVE_PORT": str(_free_port()),
        "RECLOOP_SERVE_POLL_INTERVAL_S": "1",
        # A schedule that does not fire during the test: only the run created below consumes the feedback.
        "RECLOOP_LOOP_CRON": "0 0 1 1 *",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    settings = get_settings()
    env = services.clean_environ(keep_under=[settings.home])
    for key in ("PREFECT_API_URL", "PREFECT_HOME", services.SERVICE_MARKER_ENV):
        env.pop(key, None)
    env.update(values)
    yield settings, env
    from cli import platform

    platform.down(settings)  # whatever the outcome, leave nothing running
    get_settings.cache_clear()


def _add_feedback(settings, n: int = 3) -> None:
    """Clicks of the lake's last user on popular items they have not seen, written as the service does."""
    from recloop.eventlog import EventLog
    from recloop.lake import Lake

    events = Lake(settings.lake_path).events()
    user = str(events["user_id"].iloc[-1])
    seen = set(events.loc[events["user_id"] == user, "item_id"].astype(str))
    popular = [i for i in events["item_id"].astype(str).value_counts().index if i not in seen][:n]
    log = EventLog(settings.event_log_uri)
    try:
        for item in popular:
            assert log.append_one(user, item, "click")
    finally:
        log.close()


def _wait_for_deployment(settings, name: str, timeout_s: float = 240.0) -> None:
    """Wait until the runner has registered deployment ``name`` (it imports the flows first)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    log = services.log_path(settings, "runner").read_text(errors="replace")
                    raise AssertionError(f"deployment {name} not served after {timeout_s:.0f} s:\n{log[-3000:]}") \
                        from None
                time.sleep(2)


def test_loop_deployment_runs_after_demo_exits_and_down_stops_everything(demo_env) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from recloop.lake import Lake

    settings, env = demo_env
    demo = subprocess.run([RECLOOP, "demo", "--epochs", "1", "--max-train-seconds", "60"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    output = demo.stdout + demo.stderr
    assert demo.returncode in (0, 3), output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    if demo.returncode == 3:
        assert "the gate held the model back" in demo.stderr and "Gate reasons:" in demo.stderr, demo.stderr

    # The demo process is gone; its runner (and Prefect, MLflow) keep running.
    started = {name: services.running_pid(settings, name) for name in services.SERVICE_ORDER}
    assert all(started[name] for name in ("prefect", "mlflow", "runner")), started
    pids = {pid for pid in started.values() if pid}
    for pid in list(pids):
        pids |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
    runner_env = psutil.Process(started["runner"]).environ()
    assert not {"PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"} & set(runner_env)

    _add_feedback(settings)
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        _wait_for_deployment(settings, "loop/recloop-loop")
        run = run_deployment("loop/recloop-loop", parameters={"train_params": {"epochs": 1, "max_train_seconds": 60}},
                             timeout=600, poll_interval=3)
    runner_log = services.log_path(settings, "runner").read_text(errors="replace")
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n{runner_log[-4000:]}"
    state = json.loads((settings.home / "state" / "loop.json").read_text())
    assert state["event_log_seq"] >= 3  # the run consumed the feedback
    assert "feedback" in Lake(settings.lake_path).watermarks()
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        with get_client(sync_client=True) as client:
            stages = {name: client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
                      for name in ("features", "train", "evaluate")}
    for name, runs in stages.items():  # one in the demo's pipeline, one in the loop run of the runner
        assert len(runs) == 2 and all(r.state.is_completed() for r in runs), (name, [r.state for r in runs])

    down = subprocess.run([RECLOOP, "down"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    assert {"runner", "mlflow", "prefect"} <= {s.strip() for s in down.stdout.split(":", 1)[1].split(",")}
    survivors = [proc for proc in map(_process, pids) if proc is not None]
    assert not survivors, [proc.info for proc in survivors]
    assert not _ours(settings.home)
    for port in (settings.prefect_port, settings.mlflow_port, settings.serve_port):
        assert services.port_listeners(port) == [], port
    assert os.listdir(settings.home / "run") and not list((settings.home / "run").glob("*.pid"))
