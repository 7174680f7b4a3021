"""Must-show of issue 21: forget a user through every store, every worker, re-ingestion and the next model.

Data: a slice of ml-100k (its first ``N_USERS`` users, about 8k ratings, to stay within the suite's budget)
copied with user "1" renamed to a distinctive token ``X`` (a raw id like "1" is too short to byte-search:
it occurs everywhere), plus one out-of-range rating of X so that the quarantine and the validation results
hold X too. Embedded stores (SQLite event log and Feast online store, MLflow on SQLite), so the byte-level
search covers the whole ``RECLOOP_HOME``; PostgreSQL and Redis are queried in ``test_forget.py``.

1. ingest (validation gate: quarantine, Data Docs) → lake; champion v1 trained on it; features materialised;
   two serving workers (two ``RecommenderCore`` over the same stores, like two BentoML workers);
2. X recommends and clicks on worker A, worker B reflects it;
3. forget X on worker A; every log line of the test is written to ``<home>/logs/test.log``;
4. both workers answer X as a cold start, feedback for X is refused, and the bytes of every file under the
   home (SQLite after the forget's checkpoint, Parquet, quarantine, Data Docs, MLflow artifacts, logs) hold
   no X;
5. re-ingesting the source keeps X out (dropped with a count);
6. the next loop turn retrains cold on a lake without X, records the honoured receipt on its MLflow run, and
   v1 (trained with X) is tagged and cannot be promoted back without ``--force``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
X = "forgetme-7d41c9a2e8b3f06a"
N_USERS = 80


@pytest.fixture(scope="module")
def source(ml100k_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ml-100k slice with user 1 renamed to ``X`` (and one bad rating of X's)."""
    out = tmp_path_factory.mktemp("ml100k-forget")
    for name in ("u.item", "u.genre"):
        shutil.copy(ml100k_path / name, out / name)
    rows = []
    for line in (ml100k_path / "u.data").read_text().splitlines():
        user, rest = line.split("\t", 1)
        if int(user) <= N_USERS:
            rows.append(f"{X if user == '1' else user}\t{rest}")
    rows.append(f"{X}\t50\t9\t881250949")  # rating 9: quarantined with its raw row
    (out / "u.data").write_text("\n".join(rows) + "\n")
    users = [line for line in (ml100k_path / "u.user").read_text(encoding="latin-1").splitlines()
             if int(line.split("|", 1)[0]) <= N_USERS]
    users = [X + line[1:] if line.startswith("1|") else line for line in users]
    (out / "u.user").write_text("\n".join(users) + "\n", encoding="latin-1")
    return out


def _home_files_with(home: Path, token: bytes) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and token in p.read_bytes())


def test_forget_reaches_every_store_every_worker_reingestion_and_the_next_model(source: Path, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from bench.serving import materialize_features, serving_env, train_and_register
    from flows.ingest import validated_ingest
    from recloop.forget import HOLDS_FORGOTTEN_TAG, ForgetStore, UserForgotten
    from recloop.lake import Lake
    from recloop.settings import get_settings
    from registry.aliases import PromotionRefused, promote_checked
    from serving.forget import forget_user
    from serving.runtime import build_runtime

    home = tmp_path / "home"
    env = serving_env(home, RECLOOP_EXPOSURE_FLUSH_MS="20", RECLOOP_FORGET_SETTLE_S="0.3",
                      RECLOOP_BOT_MAX_USER_SHARE="0.2")  # 80 users: one of them holds ~8 % of the slice
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    settings = get_settings()
    (home / "logs").mkdir(parents=True)
    log_file = logging.FileHandler(home / "logs" / "test.log")
    root = logging.getLogger()
    root.addHandler(log_file)
    level, root.level = root.level, logging.INFO
    try:
        # 1. ingest, champion v1 (trained with X), features, two workers
        first = validated_ingest("movielens-100k", str(source))
        assert first["rows_quarantined"] == 1
        lake = Lake(settings.lake_path)
        events = lake.events()
        n_x = int((events["user_id"] == X).sum())
        assert n_x > 100
        assert train_and_register(events, lake.items(), seed=0, seconds=3.0) == "1"
        materialize_features(events)
        workers = [build_runtime(settings), build_runtime(settings)]
        a, b = (w.core for w in workers)

        # 2. X as a known user: recommend, click on A, B reflects it
        before = a.recommend(X, k=5)
        assert before["cold_start"] is False
        clicked = before["items"][0]["item_id"]
        a.feedback(X, clicked, "click", request_id=before["request_id"], position=1)
        assert clicked not in {i["item_id"] for i in b.recommend(X, k=5)["items"]}
        assert X.encode() in (home / "eventlog.db").read_bytes() + (home / "eventlog.db-wal").read_bytes()

        # 3. forget X through worker A
        receipt = forget_user(X, settings, core=a, client=workers[0].client)
        assert receipt["status"] == "done"
        rows = receipt["rows"]
        assert rows["event_log"] == 1 and rows["lake"] == n_x + 1  # events + the users row
        assert rows["exposure_log"] >= 3 and rows["online_store"] >= 1 and rows["quarantine"] == 1

        # 4. every worker: cold start, no exposure; feedback refused; no byte of X anywhere in the home
        for core in (a, b):
            answer = core.recommend(X, k=5)
            assert answer["cold_start"] is True and answer["strategy"] == "popularity"
            with pytest.raises(UserForgotten):
                core.feedback(X, clicked, "click")
            assert core.memory_rows(X) == 0
        for w in workers:
            w.core.exposures.flush()
        assert _home_files_with(home, X.encode()) == []

        # 5. re-ingesting the source keeps X out
        again = validated_ingest("movielens-100k", str(source))
        assert again["rows_forgotten"] == n_x + 1 and again["new_events"] == 0
        assert (Lake(settings.lake_path).events()["user_id"] == X).sum() == 0

        # 6. the next loop turn trains cold without X and honours the receipt
        from flows.loop import loop_flow

        with prefect_test_harness(server_startup_timeout=120):
            turn = loop_flow(train_params={"epochs": 1}, deploy=False)
        assert turn["status"] == "done" and turn["forget"]["receipts"] == 1
        run = workers[0].client.get_run(turn["train"]["run_id"])
        assert run.data.tags["warm_start_from"] == "none"  # cold: not initialised from weights that saw X
        assert run.data.tags["data.n_users"] == str(N_USERS - 1)  # the training data lacks X
        assert run.data.tags["forget.honoured_receipts"] == "1"
        with ForgetStore(settings.event_log_uri) as store:
            (kept,) = store.receipts()
        assert kept["status"] == "honoured" and kept["honoured_by"] == run.info.run_id
        client = workers[0].client
        assert client.get_model_version(settings.model_name, "1").tags[HOLDS_FORGOTTEN_TAG] == "true"
        assert HOLDS_FORGOTTEN_TAG not in client.get_model_version(settings.model_name, "2").tags
        with pytest.raises(PromotionRefused, match="forgotten"):
            promote_checked(client, settings.model_name, "1", alias="challenger-test",
                            tracking_uri=settings.mlflow_uri)
        assert _home_files_with(home, X.encode()) == []  # the loop wrote nothing of X either
    finally:
        root.removeHandler(log_file)
        root.level = level
        log_file.close()
        get_settings.cache_clear()
