"""The bare training entry point (``python -m models.cli_train``): two gloo processes under ``torchrun`` follow
one process's loss curve. (Resuming a killed run is tests/unit/test_train_scale.py's; that models/ imports no
platform service, Prefect, MLflow, Feast or the kernel, is tests/unit/test_layering.py's rule.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _toy_events(path: Path, n_users: int = 60) -> Path:
    """Each user walks item i -> i + 1 (mod 50) from a random start (timestamps one second apart)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        start, n = rng.integers(0, 50), rng.integers(6, 14)
        for t, i in enumerate((start + np.arange(n)) % 50 + 1):
            rows.append((f"u{u}", f"i{i}", pd.Timestamp("2024-01-01") + pd.Timedelta(seconds=t)))
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_parquet(path)
    return path


@pytest.mark.slow
def test_two_gloo_processes_follow_one_process_loss_curve(tmp_path: Path) -> None:
    data = _toy_events(tmp_path / "toy.parquet")
    args = ["--data", str(data), "--epochs", "3", "--batch-size", "16", "--dropout", "0", "--d-model", "16",
            "--n-layers", "1", "--max-seq-len", "8", "--device", "cpu", "--num-threads", "1", "--json"]
    one = subprocess.run([sys.executable, "-m", "models.cli_train", *args, "--out", str(tmp_path / "one.pt")],
                         capture_output=True, text=True, cwd=REPO_ROOT, env=_env(), timeout=300)
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "models.cli_train",
                          *args, "--out", str(tmp_path / "two.pt")],
                         capture_output=True, text=True, cwd=REPO_ROOT, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    single, ddp = json.loads(one.stdout), json.loads(two.stdout)  # stdout: exactly one JSON document
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    np.testing.assert_allclose([h["loss"] for h in ddp["history"]], [h["loss"] for h in single["history"]],
                               rtol=1e-4)
    assert ddp["best_val_ndcg@10"] == pytest.approx(single["best_val_ndcg@10"], abs=1e-3)
    assert "epoch done" in two.stderr and (tmp_path / "two.pt").exists()
