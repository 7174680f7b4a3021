"""Train -> evaluate -> gate -> registry on real ML-100K data, under one Prefect test harness.

One scenario per backend (SQLite; PostgreSQL in a fresh database): a first candidate becomes
champion, a deliberately worse one (1 epoch, tiny) is rejected and the alias stays, a better one
(warm-started from the champion) is promoted, and rollback restores the previous champion. The
champion is then loaded in a fresh CPU-only process and must score a batch exactly like the
in-memory model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from recloop.contract import coerce_events
from recloop.settings import get_settings

N_USERS = 250  # ML-100K users 1..250: ~26k events, a few seconds per epoch on 2 cores
MODEL = {"d_model": 32, "n_layers": 1, "max_seq_len": 30, "dropout": 0.2}
TINY = {"d_model": 8, "n_layers": 1, "max_seq_len": 30, "dropout": 0.2}
FAST = {"device": "cpu", "batch_size": 128, "lr": 1e-2}
PG = "postgresql://postgres@127.0.0.1:5432"
BASELINES = ["MostPop"]  # the gate still compares with the best baseline; EASE/ItemKNN are unit-tested


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def events_file(tmp_path_factory: pytest.TempPathFactory, ml100k_path: Path) -> Path:
    raw = pd.read_csv(ml100k_path / "u.data", sep="\t", names=["user_id", "item_id", "value", "timestamp"])
    raw = raw[raw["user_id"] <= N_USERS].assign(event_type="rating", source="movielens-100k")
    out = tmp_path_factory.mktemp("data") / "events.parquet"
    coerce_events(raw, default_source="movielens-100k").to_parquet(out)
    return out


def _run_scenario(home: Path, tracking_uri: str | None, events_file: Path) -> dict[str, object]:
    """Run the four-step registry scenario with the given backend; return what was observed."""
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow
    from registry import aliases, tracking

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLOOP_HOME", str(home))
        mp.setenv("RECLOOP_AUTO_PROMOTE", "true")
        if tracking_uri:
            mp.setenv("RECLOOP_MLFLOW_TRACKING_URI", tracking_uri)
        else:
            mp.delenv("RECLOOP_MLFLOW_TRACKING_URI", raising=False)
        get_settings.cache_clear()
        try:
            name = get_settings().model_name
            client = tracking.configure_tracking()
            src = {"source": "parquet", "path": str(events_file)}
            seen: dict[str, object] = {"client": client, "name": name}

            first = train_flow(**src, model_params=MODEL, train_params={**FAST, "epochs": 3})
            seen["first"] = evaluate_flow(first["run_id"], baselines=BASELINES)
            seen["champion_after_first"] = aliases.get_alias_version(client, name, "champion")

            worse = train_flow(**src, model_params=TINY, train_params={**FAST, "epochs": 1, "lr": 1e-4})
            seen["worse"] = evaluate_flow(worse["run_id"], baselines=BASELINES)
            seen["champion_after_worse"] = aliases.get_alias_version(client, name, "champion")

            better = train_flow(**src, model_params=MODEL, train_params={**FAST, "epochs": 3},
                                warm_start_from="@champion")
            seen["better"] = evaluate_flow(better["run_id"], baselines=BASELINES)
            seen["champion_after_better"] = aliases.get_alias_version(client, name, "champion")
            seen["better_run"] = better

            seen["rollback"] = aliases.rollback(client, name, alias="champion")
            seen["champion_after_rollback"] = aliases.get_alias_version(client, name, "champion")
            seen["versions"] = aliases.list_versions(client, name)
            seen["first_run_id"] = first["run_id"]
            seen["tracking_uri"] = get_settings().mlflow_uri
            seen["home"] = home
            return seen
        finally:
            get_settings.cache_clear()


def _assert_scenario(seen: dict[str, object]) -> None:
    first, worse, better = seen["first"], seen["worse"], seen["better"]
    assert first["passed"] and first["promoted"], first["decision"]["reasons"]
    assert seen["champion_after_first"] == first["version"]
    # The worse candidate is a version, tagged as rejected, and the champion did not move.
    assert not worse["passed"], worse["decision"]["reasons"]
    assert worse["metrics"]["candidate"]["ndcg@10"] < first["metrics"]["candidate"]["ndcg@10"]
    assert seen["champion_after_worse"] == first["version"]
    assert better["passed"] and better["promoted"], better["decision"]["reasons"]
    first_ndcg = first["metrics"]["candidate"]["ndcg@10"]
    assert better["decision"]["champion_ndcg"] == pytest.approx(first_ndcg, abs=1e-9)  # champion re-scored
    assert seen["champion_after_better"] == better["version"]
    move = seen["rollback"]
    assert (move.previous, move.version) == (better["version"], first["version"])
    assert seen["champion_after_rollback"] == first["version"]
    client, name = seen["client"], seen["name"]
    tags = client.get_model_version(name, worse["version"]).tags
    assert tags["gate.decision"] == "fail" and tags["gate.champion_version"] == first["version"]
    assert client.get_model_version(name, better["version"]).tags["rolled_back"] == f"to {first['version']}"
    assert [v["version"] for v in seen["versions"]] == ["3", "2", "1"]


pytestmark = pytest.mark.slow  # each scenario trains three small models (~1-2 min on 2 cores)


@pytest.fixture(scope="module")
def sqlite_scenario(harness: None, tmp_path_factory: pytest.TempPathFactory, events_file: Path
                    ) -> dict[str, object]:
    return _run_scenario(tmp_path_factory.mktemp("sqlite-home"), None, events_file)


def test_worse_candidate_rejected_better_promoted_rollback_restores_sqlite(sqlite_scenario: dict) -> None:
    _assert_scenario(sqlite_scenario)


def test_run_logs_params_metrics_fingerprint_and_artifacts(sqlite_scenario: dict, events_file: Path) -> None:
    client = sqlite_scenario["client"]
    run = client.get_run(sqlite_scenario["first_run_id"])
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.d_model"] == "32" and params["train.epochs"] == "3" and params["train.seed"] == "42"
    assert params["split.split"] == "leave-one-out"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val.ndcg_at_10")] == [1, 2, 3]
    for key in ("loss", "seq_per_s", "val.hr_at_10", "test.ndcg_at_10", "test.coverage_at_10",
                "test.MostPop.ndcg_at_10"):
        assert key in metrics, key
    events = pd.read_parquet(events_file)
    assert tags["data.n_events"] == str(len(events)) and tags["data.source"] == "parquet"
    assert len(tags["data.sha256"]) == 64 and tags["data.time_max"] == events["timestamp"].max().isoformat()
    assert tags["sys.device"] == "cpu" and tags["sys.torch"] == torch.__version__ and tags["sys.cpu"]
    assert tags["git.commit"] != "" and tags["gate.decision"] == "pass"
    artifacts = {f.path for d in ("training", "plots", "evaluation")
                 for f in client.list_artifacts(run.info.run_id, d)}
    assert {"training/checkpoint.pt", "training/vocab.json", "training/config.json",
            "plots/learning_curve.png", "plots/model_comparison.png", "plots/popularity.png",
            "evaluation/evaluation.json", "evaluation/evaluation.md",
            "evaluation/rerank_tradeoff.json", "plots/rerank_tradeoff.png"} <= artifacts
    def read(artifact: str) -> str:
        return Path(client.download_artifacts(run.info.run_id, artifact)).read_text()

    report = json.loads(read("evaluation/evaluation.json"))
    assert report["gate"]["passed"] and report["protocol"]["ranking"] == "full"
    assert "| candidate |" in read("evaluation/evaluation.md")
    # The re-ranking trade-off: validation curves of both re-rankers, the default chosen there, test once at it.
    tradeoff = json.loads(read("evaluation/rerank_tradeoff.json"))
    assert set(tradeoff["valid_curves"]) == {"mmr", "dpp"} and tradeoff["protocol"]["valid_users"] > 0
    for method, curve in tradeoff["valid_curves"].items():
        assert [p["diversity"] for p in curve] == tradeoff["protocol"]["grid"]
        chosen = tradeoff["default_diversity"][method]
        assert tags[f"rerank.default_diversity.{method}"] == f"{chosen:g}"
        base = curve[0]["ndcg@10"]
        assert next(p for p in curve if p["diversity"] == chosen)["ndcg@10"] >= (1 - 0.05) * base
        assert set(tradeoff["test_once"][method]) == {"diversity=0", f"diversity={chosen:g}"}
    plain = tradeoff["valid_curves"]["mmr"][0]  # diversity 0: the model's own order, whichever re-ranker
    assert plain["ndcg@10"] == tradeoff["valid_curves"]["dpp"][0]["ndcg@10"]
    assert "**Diversity re-ranking**" in read("evaluation/evaluation.md")
    model = client.get_logged_model(tags["model.uri"].removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id


def test_champion_scores_identically_in_a_fresh_cpu_process(sqlite_scenario: dict, tmp_path: Path) -> None:
    from models.checkpoint import load_checkpoint
    from registry import store as model_store

    client, name = sqlite_scenario["client"], sqlite_scenario["name"]
    loaded = model_store.load_version(name, alias="champion", client=client)
    assert type(loaded.model).__name__ == "SASRec" and not loaded.model.training
    ckpt = client.download_artifacts(loaded.run_id, "training/checkpoint.pt", str(tmp_path))
    trained, vocab, _ = load_checkpoint(ckpt)
    assert vocab == loaded.vocab
    rng = np.random.default_rng(0)
    batch = rng.integers(1, len(vocab) + 1, size=(16, 30)).astype(np.int64)
    batch[:4, :20] = 0  # some short, left-padded histories
    np.save(tmp_path / "batch.npy", batch)
    script = (
        "import sys, numpy as np, torch, mlflow\n"
        "uri, inp, out = sys.argv[1:4]\n"
        "mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)\n"
        "inner = mlflow.pyfunc.load_model('models:/recloop-sasrec@champion').unwrap_python_model()\n"
        "np.save(out, inner.model.score(torch.from_numpy(np.load(inp))).numpy())\n"
        "print(type(inner.model).__name__, torch.cuda.is_available(), inner.model.training)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script, sqlite_scenario["tracking_uri"],
                           str(tmp_path / "batch.npy"), str(tmp_path / "scores.npy")],
                          capture_output=True, text=True, timeout=180, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["SASRec", "False", "False"]
    fresh = np.load(tmp_path / "scores.npy")
    expected = trained.score(torch.from_numpy(batch)).numpy()
    np.testing.assert_array_equal(fresh, expected)
    np.testing.assert_array_equal(fresh, loaded.model.score(torch.from_numpy(batch)).numpy())


def test_pyfunc_predict_returns_top_k_unseen_items(sqlite_scenario: dict) -> None:
    import mlflow

    from models.ranking import recommend
    from registry import store as model_store

    mlflow.set_registry_uri(sqlite_scenario["tracking_uri"])
    name, client = sqlite_scenario["name"], sqlite_scenario["client"]
    loaded = model_store.load_version(name, alias="champion", client=client)
    history = list(loaded.vocab.ids[:5])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{sqlite_scenario['name']}/{loaded.version}")
    out = pyfunc.predict(pd.DataFrame({"history": [history, []]}), params={"k": 5})
    assert out["item_ids"][0] == [i for i, _ in recommend(loaded.model, loaded.vocab, [history], k=5)[0]]
    assert not set(out["item_ids"][0]) & set(history) and len(out["item_ids"][1]) == 5


def test_cli_lists_promotes_and_rolls_back(sqlite_scenario: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from registry.aliases import get_alias_version

    monkeypatch.setenv("RECLOOP_HOME", str(sqlite_scenario["home"]))
    get_settings.cache_clear()
    client, name = sqlite_scenario["client"], sqlite_scenario["name"]
    runner = CliRunner()
    listed = runner.invoke(app, ["model", "list"])
    assert listed.exit_code == 0 and "champion" in listed.output and "fail" in listed.output
    promoted = runner.invoke(app, ["model", "promote", "3"])
    assert promoted.exit_code == 0 and promoted.output.strip() == "champion: 1 -> 3"
    assert get_alias_version(client, name, "champion") == "3"
    rolled = runner.invoke(app, ["model", "rollback"])
    assert rolled.exit_code == 0 and rolled.output.strip() == "champion: 3 -> 1"
    again = runner.invoke(app, ["model", "rollback"])  # nothing before version 1
    assert again.exit_code == 1 and get_alias_version(client, name, "champion") == "1"
    get_settings.cache_clear()


@pytest.mark.postgres
def test_same_registry_scenario_on_postgresql(harness: None, tmp_path: Path, events_file: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    db = f"recloop_mlflow_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(f"{PG}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {err}")
    with admin:
        admin.execute(f'CREATE DATABASE "{db}"')
        try:
            uri = f"postgresql+psycopg://{PG.split('://')[1]}/{db}"
            seen = _run_scenario(tmp_path / "home", uri, events_file)
            assert seen["tracking_uri"].startswith("postgresql")
            _assert_scenario(seen)
        finally:
            admin.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
