"""`bentoml build` of the Recommender works offline and pins the model version (docs/stack-notes.md recipe)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from serving.bento_build import build, pin_bentofile, requirements_without_torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_requirements_for_the_bento_drop_torch_only() -> None:
    lock = (REPO_ROOT / "requirements.lock").read_text()
    out = requirements_without_torch(lock)
    assert "torch==" not in out and "bentoml==" in out and "mlflow==" in out


def test_bentofile_holds_no_machine_path_and_pins_a_version() -> None:
    text = (REPO_ROOT / "infra" / "bentofile.yaml").read_text()
    assert "/work/" not in text and "/opt/" not in text and "/root/" not in text
    pinned = yaml.safe_load(pin_bentofile(text, "7"))
    assert pinned["labels"]["model_version"] == "7"
    assert {"name": "RECLOOP_SERVE_MODEL_VERSION", "value": "7"} in pinned["envs"]


@pytest.mark.slow
def test_offline_build_pins_the_version_and_carries_the_cpu_torch_wheel(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    out = build(version="7")
    version = re.search(r"recloop-recommender:(\w+)", out).group(1)
    bento = tmp_path / "bentoml" / "bentos" / "recloop-recommender" / version
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["labels"]["model_version"] == "7"
    assert {e["name"]: e["value"] for e in meta["envs"]}["RECLOOP_SERVE_MODEL_VERSION"] == "7"
    wheels = list(bento.rglob("torch-2.13.0*cpu*.whl"))
    assert wheels, "the CPU torch wheel must travel inside the Bento"
    assert (bento / "src" / "serving" / "service.py").exists()
    assert not (bento / "src" / "tests").exists()
