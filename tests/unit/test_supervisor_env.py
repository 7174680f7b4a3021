"""The environment every platform child gets (supervisor/services.py clean_environ / service_env).

Issue 12: the runner started by `recloop demo` inherited a Feast Prometheus temp dir that the demo
process deleted on exit, so every scheduled loop run failed in the features stage.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from recloop.settings import Settings
from supervisor import services

TMP = Path(tempfile.gettempdir()).resolve()


def test_both_prometheus_spellings_are_dropped_even_when_inherited() -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(TMP / "feast_metrics_a"),
           "PROMETHEUS_MULTIPROCESS_DIR": str(TMP / "feast_metrics_a"), "PATH": "/usr/bin"}
    cleaned = services.clean_environ(environ=env, inherited=env)
    assert "PROMETHEUS_MULTIPROC_DIR" not in cleaned
    assert "PROMETHEUS_MULTIPROCESS_DIR" not in cleaned
    assert cleaned["PATH"] == "/usr/bin"


def test_temp_paths_set_by_this_process_are_dropped_or_restored(tmp_path: Path) -> None:
    home = tmp_path / "home"
    inherited = {"PATH": "/usr/bin", "TMPDIR": str(TMP), "USER_CACHE": str(TMP / "users-own-cache")}
    env = {
        **inherited,
        "LIB_SCRATCH": str(TMP / "lib_abc123"),  # a library's mkdtemp
        "LIB_URI": f"file://{TMP}/lib_def456/store",  # the same as a URL
        "LIB_SEARCH_PATH": f"/opt/lib{os.pathsep}{TMP}/lib_ghi789",  # inside a path list
        "TMPDIR": str(TMP / "lib_private_tmp"),  # a library moved TMPDIR into its own temp dir
        "RECLOOP_EVENT_LOG_URL": f"sqlite:///{tmp_path}/other/eventlog.db",  # explicit configuration
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",  # the platform's home outlives the process
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",  # set here, but no path
    }
    cleaned = services.clean_environ(keep_under=[home], environ=env, inherited=inherited)
    for key in ("LIB_SCRATCH", "LIB_URI", "LIB_SEARCH_PATH"):
        assert key not in cleaned, key
    assert cleaned["TMPDIR"] == str(TMP)  # the value the process started with
    assert cleaned["USER_CACHE"] == inherited["USER_CACHE"]  # inherited unchanged: the user's choice
    for key in ("RECLOOP_EVENT_LOG_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PATH"):
        assert cleaned[key] == env[key], key


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")
def test_inherited_environ_ignores_changes_made_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECLOOP_TEST_SET_IN_PROCESS", "1")
    inherited = services.inherited_environ()
    assert "RECLOOP_TEST_SET_IN_PROCESS" not in inherited
    assert inherited.get("PATH") == os.environ.get("PATH") or "PATH" not in os.environ


def test_service_env_is_clean_and_points_at_the_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tempfile.mkdtemp(prefix="feast_metrics_")  # what importing Feast does
    try:
        monkeypatch.setenv("PROMETHEUS_MULTIPROCESS_DIR", scratch)
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", scratch)
        monkeypatch.setenv("SOME_LIB_TMP", os.path.join(scratch, "sub"))
        monkeypatch.setenv(services.SERVICE_MARKER_ENV, "runner")  # e.g. called from a runner's flow run
        if not Path("/proc/self/environ").exists():
            monkeypatch.setattr(services, "_ENV_AT_IMPORT", {})
        settings = Settings(home=tmp_path / "home", prefect_port=4321)
        env = services.service_env(settings)
    finally:
        os.rmdir(scratch)
    for key in ("PROMETHEUS_MULTIPROCESS_DIR", "PROMETHEUS_MULTIPROC_DIR", "SOME_LIB_TMP",
                services.SERVICE_MARKER_ENV):
        assert key not in env, key
    assert env["RECLOOP_HOME"] == str(settings.home)
    assert env["PREFECT_HOME"] == str(settings.home / "prefect")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["DO_NOT_TRACK"] == "true"


def test_unknown_service_names_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runner"):
        services.check_port(Settings(home=tmp_path), "grafana")


def test_specs_declare_ports_and_signatures(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, prefect_port=1111, mlflow_port=2222, serve_port=3333)
    table = services.specs(settings)
    assert {n: s.port for n, s in table.items()} == {"prefect": 1111, "mlflow": 2222, "serving": 3333,
                                                     "runner": None}
    assert all(s.signature for s in table.values())
    assert table["runner"].argv[0] == sys.executable
