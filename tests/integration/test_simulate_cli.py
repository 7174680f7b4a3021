"""`recloop simulate --json`: a 1-round synthetic simulation on a scratch platform of its own (CI's smoke run).

The command starts its own Prefect server and BentoML service in a scratch home on free ports, runs the
pipeline on the synthetic source (a 1-epoch model, served with ``--force-first`` when the gate holds it
back), lets 10 simulated users run one session each over HTTP, and tears everything down. About 75 s on
2 shared cores (platform start and the first training dominate); marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from supervisor import services

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
RECLOOP = str(Path(sys.executable).with_name("recloop"))


def _processes_of(home: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RECLOOP_HOME") == str(home):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_simulate_one_synthetic_round_prints_one_json_document_and_leaves_nothing_running(tmp_path: Path) -> None:
    scratch = (tmp_path / "scratch").resolve()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_HOME", services.SERVICE_MARKER_ENV)}
    env["RECLOOP_HOME"] = str(tmp_path / "user-home")  # the caller's own home: never touched
    cmd = [RECLOOP, "simulate", "--source", "synthetic", "--users", "10", "--rounds", "1", "--sessions-per-round", "1",
           "--epochs", "1", "--max-train-seconds", "20", "--force-first", "--home", str(scratch), "--json"]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout)  # one JSON document, nothing else on stdout
    assert run.stdout.strip().count("\n") == 0
    protocol = out["protocol"]
    assert protocol["target"] == "scratch" and protocol["source"] == "synthetic" and protocol["users"] == 10
    assert protocol["home"] == str(scratch) and protocol["calibration"]["achieved_top_ctr"] is not None
    assert len(out["rounds"]) == 1
    (only,) = out["rounds"]
    assert only["errors"] == 0 and only["failed_sessions"] == 0 and only["sessions"] == 10 and out["errors"] == 0
    assert 0.0 <= only["ctr_at_k"] <= 1.0 and only["model_version"] == protocol["first_model"]["version"]
    assert out["feedback_acknowledged"] == only["clicks"] + only["skips"] == only["feedbacks"]
    assert "loop" not in only  # no loop after the last round
    assert out["mlflow_run_id"] and out["sessions_per_s"] > 0
    assert not (tmp_path / "user-home").exists()
    assert _processes_of(scratch) == []  # torn down
    assert not list((scratch / "run").glob("*.pid"))
