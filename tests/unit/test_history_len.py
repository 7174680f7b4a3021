"""A model whose max_seq_len exceeds settings.max_seq_len gets its whole history online: serving (start-up,
alias swap, experiment arms) and materialisation keep ``recloop.settings.online_history_len`` items per user."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from fakes import MemoryLog, MemoryOnline, Sink, tiny_served

import serving.runtime as runtime_mod
from recloop.contract import coerce_events
from recloop.lake import Lake
from recloop.settings import Settings, online_history_len
from recloop.sources.base import SourceFrames
from serving.recommender import RecommenderCore
from serving.runtime import ChampionWatcher, Runtime, load_catalogue

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SETTINGS_LEN, MODEL_LEN = 50, 100


def _events(n_per_user: dict[str, int]) -> pd.DataFrame:
    """``n`` clicks per user on items i1..i50 in turn, one minute apart."""
    rows = [{"event_id": f"{u}-{k}", "user_id": u, "item_id": f"i{k % 50 + 1}", "event_type": "click",
             "timestamp": T0 + timedelta(minutes=k)} for u, n in n_per_user.items() for k in range(n)]
    return coerce_events(pd.DataFrame(rows), default_source="synthetic")


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    """Settings at max_seq_len 50 over a lake where user ``long`` has 120 events and ``mixed`` 80."""
    s = Settings(home=tmp_path / "home", max_seq_len=SETTINGS_LEN, exposure_log=False)
    Lake(s.lake_path).ingest(SourceFrames(events=_events({"long": 120, "mixed": 80})), batch_id="b1")
    return s


def _log_clicks(log: MemoryLog, user: str, n: int) -> None:
    """``n`` clicks of ``user`` in the event log, after the lake snapshot (items i1..)."""
    now = datetime.now(UTC)
    for k in range(n):
        log.append_and_recent({"event_id": f"log-{user}-{k}", "user_id": user, "item_id": f"i{k + 1}",
                               "event_type": "click", "value": None, "timestamp": now + timedelta(seconds=k),
                               "source": "api"}, 1)


def _context_len(core: RecommenderCore, sink: Sink, user: str) -> int:
    """Items of ``user``'s history the served model scored (the exposure's context: the last seq_len)."""
    core.recommend(user, k=5)
    return len(sink.rows[-1]["context"])


def test_online_history_len_is_the_longest_model_window_never_below_the_settings() -> None:
    assert online_history_len(50) == 50
    assert online_history_len(50, [100, None, 8]) == 100
    assert online_history_len(50, [20, 8]) == 50  # a shorter model truncates its input itself
    with pytest.raises(ValueError, match="must be >= 1"):
        online_history_len(50, [0])


def test_an_alias_swap_to_a_longer_model_grows_the_served_history_and_a_shorter_one_still_serves(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = load_catalogue(settings.lake_path, settings.max_seq_len)
    sink, log = Sink(), MemoryLog()
    core = RecommenderCore(tiny_served(version="1", max_seq_len=SETTINGS_LEN), MemoryOnline(), log,
                           max_seq_len=SETTINGS_LEN, base_history=cat.base_history, consumed=cat.consumed,
                           exposures=sink)
    watcher = ChampionWatcher(Runtime(settings, None, core, cat.titles, cat.popularity, "1", None))
    alias = {"version": "2"}
    monkeypatch.setattr("registry.aliases.get_alias_version", lambda *a: alias["version"])
    monkeypatch.setattr("registry.aliases.record_last_good", lambda *a: True)
    lengths = {"2": MODEL_LEN, "3": 8}
    monkeypatch.setattr(runtime_mod, "served_from_registry",
                        lambda s, c, v, *a: tiny_served(seed=int(v), version=v, max_seq_len=lengths[v]))
    assert core.feedback("long", "i7", "click")["recent_items"] == SETTINGS_LEN  # before: the settings' 50

    assert watcher.poll_once() is True and core.served.seq_len == MODEL_LEN
    assert core.max_seq_len == MODEL_LEN and len(core.base_history["long"][0]) == MODEL_LEN
    ack = core.feedback("long", "i9", "click")  # the push holds the model's whole window
    assert ack["recent_items"] == MODEL_LEN and len(core.online.recent_items("long")) == MODEL_LEN
    assert _context_len(core, sink, "long") == MODEL_LEN  # 100 items scored, not 50
    _log_clicks(log, "mixed", 40)  # lake 80 + log 40: the sources give the last 100 of the 120
    rebuilt = core.history_from_sources("mixed")
    assert len(rebuilt) == MODEL_LEN and rebuilt[-40:] == [f"i{k + 1}" for k in range(40)]

    alias["version"] = "3"  # a model with a shorter window: the settings' length, the model truncates
    assert watcher.poll_once() is True and core.max_seq_len == SETTINGS_LEN
    assert _context_len(core, sink, "long") == 8


def test_an_experiment_arm_with_a_longer_window_grows_the_history(settings: Settings,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cat = load_catalogue(settings.lake_path, settings.max_seq_len)
    core = RecommenderCore(tiny_served(version="1", max_seq_len=SETTINGS_LEN), MemoryOnline(), MemoryLog(),
                           max_seq_len=SETTINGS_LEN, base_history=cat.base_history)
    exp = SimpleNamespace(experiment_id="exp", mode="ab", weights=(50.0, 50.0), salt="s", champion_version="1",
                          challenger_version="2")
    store = SimpleNamespace(active=lambda: exp)
    watcher = ChampionWatcher(Runtime(settings, None, core, cat.titles, cat.popularity, "1", None, store))
    monkeypatch.setattr(runtime_mod, "served_from_registry",
                        lambda s, c, v, *a: tiny_served(seed=2, version=v, max_seq_len=MODEL_LEN))
    assert watcher.poll_experiment() is True and core.experiment_arms.challenger.seq_len == MODEL_LEN
    assert core.max_seq_len == MODEL_LEN and len(core.base_history["long"][0]) == MODEL_LEN


def test_start_up_serves_a_longer_champion_its_whole_window(settings: Settings,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    champion = tiny_served(version="1", max_seq_len=MODEL_LEN)
    monkeypatch.setattr("registry.tracking.configure_tracking", lambda s: None)
    monkeypatch.setattr(runtime_mod, "load_champion", lambda *a: (champion, "1", None))
    monkeypatch.setattr(runtime_mod, "_tombstones", lambda s: None)
    monkeypatch.setattr(runtime_mod, "_text_catalog", lambda s: None)
    monkeypatch.setattr(RecommenderCore, "start_online_sync", lambda self, *a, **k: None)
    monkeypatch.setattr(runtime_mod.torch, "set_num_threads", lambda n: None)  # leave the test process as is
    sink = Sink()
    rt = runtime_mod.build_runtime(settings, online=MemoryOnline(), events=MemoryLog(), exposures=sink,
                                   experiments=object(), blocklist=SimpleNamespace(item_ids=frozenset))
    core = rt.core
    assert core.max_seq_len == MODEL_LEN and len(core.base_history["long"][0]) == MODEL_LEN
    assert len(rt.sequences[0]) <= SETTINGS_LEN  # the short-history blend's windows keep the settings' length
    assert core.feedback("long", "i3", "click")["recent_items"] == MODEL_LEN
    assert _context_len(core, sink, "long") == MODEL_LEN


def test_materialised_history_len_follows_the_served_and_the_newest_tuned_model(settings: Settings) -> None:
    from flows.features import MAX_SEQ_LEN_PARAM, materialised_history_len
    from flows.train import TUNE_EXPERIMENT, TUNED_TAG
    from registry.aliases import register_version, set_alias
    from registry.tracking import configure_tracking, ensure_experiment

    assert materialised_history_len(settings) == SETTINGS_LEN  # no tracking store yet: none is created
    assert not Path(settings.mlflow_uri.removeprefix("sqlite:///")).exists()
    client = configure_tracking(settings)
    assert materialised_history_len(settings, client) == SETTINGS_LEN  # nothing served or tuned
    run = client.create_run(ensure_experiment(client, settings=settings))
    client.log_param(run.info.run_id, MAX_SEQ_LEN_PARAM, str(MODEL_LEN))  # what flows.train logs
    version = register_version(client, settings.model_name, "file:///nowhere", run.info.run_id).version
    set_alias(client, settings.model_name, settings.model_alias, version)
    assert materialised_history_len(settings) == MODEL_LEN  # the champion's window

    def tuned(model_class: str, max_seq_len: int) -> None:  # a best-parameters run as flows.tune records it
        params = {"model": {"max_seq_len": max_seq_len}, "train": {}}
        client.create_run(ensure_experiment(client, TUNE_EXPERIMENT, settings),
                          tags={TUNED_TAG: "true", "model.class": model_class, "tune.params": json.dumps(params)})

    tuned("gru4rec", 300)  # another class: not what the next cold train of settings.model_class uses
    assert materialised_history_len(settings, client) == MODEL_LEN
    tuned(settings.model_class, 200)
    assert materialised_history_len(settings, client) == 200


def test_materialisation_writes_the_longer_recent_items(settings: Settings, tmp_path: Path) -> None:
    from featurestore.materialize import refresh_features

    class Store:  # the Feast calls refresh_features makes
        def __init__(self, repo: Path) -> None:
            self.repo_path, self.rows = repo, {}

        def apply(self, objects: list) -> None:
            pass

        def write_to_online_store(self, view: str, rows: pd.DataFrame) -> None:
            self.rows[view] = rows

    events = Lake(settings.lake_path).events()
    now = datetime.now(UTC)
    lengths = {}
    for history_len in (None, MODEL_LEN):
        home = tmp_path / f"features-{history_len}"  # each build its own watermark
        store = Store(home)
        refresh_features(store, Settings(home=home, max_seq_len=SETTINGS_LEN), events, None, None, now,
                         history_len=history_len)
        rows = store.rows["user_recent_items"].set_index("user_id")["recent_item_ids"]
        lengths[history_len] = len(rows["long"])
    assert lengths == {None: SETTINGS_LEN, MODEL_LEN: MODEL_LEN}


def test_an_incremental_turn_rebuilds_in_full_when_the_history_grew(settings: Settings, tmp_path: Path) -> None:
    from featurestore.incremental import full_state, update_features, write_state
    from featurestore.materialize import EVENT_VIEWS, SOURCE_FILES

    lake = Lake(settings.lake_path)
    features_dir = tmp_path / "features"
    for view in EVENT_VIEWS:
        (features_dir / SOURCE_FILES[view]).mkdir(parents=True)
    events = lake.events()
    write_state(features_dir, *full_state(events, ["b1"], T0 + timedelta(days=1), history_len=SETTINGS_LEN))
    now = datetime.now(UTC)
    assert update_features(None, lake, features_dir, now, n=MODEL_LEN) is None  # every list must grow
    assert update_features(None, lake, features_dir, now, n=SETTINGS_LEN)["mode"] == "incremental"
