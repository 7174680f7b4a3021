"""Wiring of the service process: settings -> MLflow champion, event log, online store; champion polling.

Kept apart from ``serving/service.py`` so that the BentoML module stays a thin adapter and this
wiring can be exercised without an HTTP server.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from recloop.settings import Settings, configure_environment, get_settings
from serving.recommender import RecommenderCore, ServedModel, build_served
from serving.schemas import ModelInfo

logger = logging.getLogger(__name__)


@dataclass
class Catalogue:
    """What the service reads from the lake: titles, popularity and each user's lake history."""

    titles: dict[str, str] = field(default_factory=dict)
    popularity: dict[str, float] = field(default_factory=dict)
    base_history: dict[str, tuple[list[str], Any]] = field(default_factory=dict)


def load_catalogue(lake_path: Path, max_seq_len: int = 50) -> Catalogue:
    """Item titles, event counts and per-user lake histories from the lake (empty when absent).

    ``base_history[user_id]`` is (the user's last ``max_seq_len`` item ids, oldest first; the
    timestamp of the user's newest lake event): the feedback path appends the event log's newer
    events to it.
    """
    import pyarrow

    from recloop.lake import Lake

    cat = Catalogue()
    lake = Lake(lake_path)  # committed batches only; latest version of each item
    try:
        items = lake.items()
        if len(items):
            cat.titles = dict(zip(items["item_id"].astype(str), items["title"].astype(str), strict=True))
        events = lake.events()  # ordered by (timestamp, ingest order)
        cat.popularity = {str(k): float(v) for k, v in events["item_id"].value_counts().items()}
        tail = events.groupby("user_id", sort=False).tail(max_seq_len)
        last_ts = events.groupby("user_id", sort=False)["timestamp"].max()
        cat.base_history = {
            str(u): (g["item_id"].astype(str).tolist(), last_ts[u].to_pydatetime())
            for u, g in tail.groupby("user_id", sort=False)
        }
    except (OSError, ValueError, KeyError, pyarrow.ArrowException) as err:
        logger.warning("catalogue not read from lake path=%s error=%s", lake_path, err)
    return cat


@dataclass
class Runtime:
    """The live objects of one service process."""

    settings: Settings
    client: Any  # MlflowClient
    core: RecommenderCore
    titles: dict[str, str]
    popularity: dict[str, float]


def served_from_registry(rt_settings: Settings, client: Any, version: str | None,
                         titles: dict[str, str], popularity: dict[str, float]) -> ServedModel:
    """Load a registered version (or the alias when ``version`` is None) and prepare it (smoke-scored)."""
    from registry.store import load_version

    if version is None:
        loaded = load_version(rt_settings.model_name, alias=rt_settings.model_alias, client=client)
    else:
        loaded = load_version(rt_settings.model_name, version=version, client=client)
    return build_served(
        loaded.model, loaded.vocab, loaded.version, loaded.run_id, loaded.extra,
        titles=titles or None, popularity=popularity or None,
    )


def build_runtime(settings: Settings | None = None) -> Runtime:
    """Connect to MLflow, the event log and the online store; load the champion.

    Raises:
        LookupError: the registered model has no ``settings.model_alias`` alias.
    """
    configure_environment()
    torch.set_num_threads(1)  # one request = one tiny forward pass; threads only add contention
    settings = settings or get_settings()
    from featurestore.online import OnlineFeatures
    from recloop.eventlog import EventLog
    from registry.tracking import configure_tracking

    client = configure_tracking(settings)
    cat = load_catalogue(settings.lake_path, settings.max_seq_len)
    titles, popularity = cat.titles, cat.popularity
    pinned = settings.serve_model_version or None
    served = served_from_registry(settings, client, pinned, titles, popularity)
    core = RecommenderCore(
        served, OnlineFeatures(settings=settings), EventLog(settings.event_log_uri),
        max_seq_len=settings.max_seq_len, variant=settings.model_alias, base_history=cat.base_history,
    )
    logger.info("service ready model=%s version=%s", settings.model_name, served.version)
    return Runtime(settings, client, core, titles, popularity)


class ChampionWatcher:
    """Polls the registry alias and swaps in a new champion: load, smoke-score, one assignment."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.last_poll_at: str | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()

    @property
    def model_loaded(self) -> bool:
        return self.rt.core.served is not None

    def poll_once(self) -> bool:
        """Check the alias once; returns True when a new version was swapped in.

        A failure (registry unreachable, broken artifact, smoke score) is logged and kept in
        ``last_error``; the current model keeps serving.
        """
        from registry.aliases import get_alias_version

        s = self.rt.settings
        self.last_poll_at = datetime.now(UTC).isoformat()
        try:
            if s.serve_model_version:  # a pinned deployment never follows the alias
                return False
            version = get_alias_version(self.rt.client, s.model_name, s.model_alias)
            if version is None or version == self.rt.core.served.version:
                return False
            # A new version may know new items: refresh titles and popularity from the lake first.
            cat = load_catalogue(s.lake_path, s.max_seq_len)
            self.rt.titles, self.rt.popularity = cat.titles, cat.popularity
            served = served_from_registry(s, self.rt.client, version, self.rt.titles, self.rt.popularity)
        except Exception as err:  # noqa: BLE001 - any load failure must keep the old model serving
            self.last_error = f"{type(err).__name__}: {err}"[:500]
            logger.error("champion reload failed; keeping version=%s error=%s",
                         self.rt.core.served.version, self.last_error)
            return False
        self.rt.core.base_history = cat.base_history  # one reference assignment, like the model swap
        self.rt.core.swap(served)
        self.last_error = None
        return True

    def run_forever(self) -> None:
        """Poll every ``settings.serve_poll_interval_s`` until ``stop()`` (daemon thread body)."""
        while not self._stop.wait(self.rt.settings.serve_poll_interval_s):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()

    def info(self) -> ModelInfo:
        served = self.rt.core.served
        return ModelInfo(
            model_name=self.rt.settings.model_name,
            alias=self.rt.settings.model_alias,
            version=served.version,
            run_id=served.run_id,
            n_items=len(served.vocab),
            vocab_version=served.vocab.version,
            loaded_at=served.loaded_at,
            last_poll_at=self.last_poll_at,
            last_error=self.last_error,
        )
