"""`recloop demo` when the gate holds the candidate back: a clear message and exit 3, never a traceback.

The pipeline result is faked (no training): ``flows.pipeline`` is replaced by a stub module, and the
platform's ``up`` and the interaction are stubbed, so the test runs in about a second.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from typer.testing import CliRunner

REASONS = ["PASS no champion yet: champion rules skipped", "FAIL ndcg@10 0.1133 vs best baseline Markov1 0.1698"]


def _evaluation(passed: bool) -> dict[str, Any]:
    return {"run_id": "r1", "version": "1", "passed": passed, "promoted": False,
            "decision": {"passed": passed, "reasons": REASONS}, "metrics": {}, "report_md": "| model |\n"}


@pytest.fixture()
def fake_platform(recloop_home, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Stubs: the pipeline (deploy skipped, gate failed), ``up`` (records names), the interaction (must not run)."""
    from cli import platform

    calls: dict[str, list] = {"up": [], "pipeline": []}
    fake = types.ModuleType("flows.pipeline")

    def pipeline_flow(**kwargs: Any) -> dict[str, Any]:
        calls["pipeline"].append(kwargs)
        return {"ingest": {}, "features": {}, "train": {}, "evaluate": _evaluation(False), "deploy": None}

    fake.pipeline_flow = pipeline_flow
    monkeypatch.setitem(sys.modules, "flows.pipeline", fake)
    monkeypatch.setattr(platform, "up", lambda settings, names, wait=True: calls["up"].append(names) or {})

    def no_interaction(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing serves: the demo must not call the recommender")

    monkeypatch.setattr(platform, "interact", no_interaction)
    # _prefect_env() writes these into os.environ; setenv first so they are restored afterwards.
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("PREFECT_HOME", str(recloop_home / "prefect"))
    return calls


def test_demo_reports_the_gate_holding_the_model_back(fake_platform: dict[str, list]) -> None:
    from cli.main import app

    result = CliRunner().invoke(app, ["demo", "--epochs", "1", "--max-train-seconds", "5"])
    assert result.exit_code == 3, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not an escaped exception
    assert "Traceback" not in result.output and "ConnectError" not in result.output
    assert "the gate held the model back" in result.stderr
    assert "candidate version 1" in result.stderr
    for reason in REASONS:
        assert reason in result.stderr
    assert "recloop down" in result.stderr
    assert fake_platform["pipeline"][0]["train_params"] == {"epochs": 1, "max_train_seconds": 5.0}
    assert fake_platform["up"] == [("prefect", "mlflow"), ("runner",)]  # the loop runner still starts


def test_demo_raises_no_champion_error_with_the_reasons(fake_platform: dict[str, list]) -> None:
    from cli.platform import NoChampionError, demo

    with pytest.raises(NoChampionError) as info:
        demo(epochs=1)
    assert info.value.version == "1" and info.value.passed is False
    assert info.value.reasons == REASONS


def test_message_when_the_gate_passed_but_promotion_is_off() -> None:
    from cli.platform import held_back_message

    text = held_back_message(_evaluation(True), "prod")
    assert "auto-promotion is off" in text and "recloop model promote 1" in text and "'prod'" in text
    assert "held the model back" not in text
    assert all(reason in text for reason in REASONS)
