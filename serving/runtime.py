"""Wiring of the service process: settings -> MLflow champion, event log, online store; champion polling.

Kept apart from ``serving/service.py`` so that the BentoML module stays a thin adapter and this
wiring can be exercised without an HTTP server.

Start-up never crash-loops on a bad promotion: when the alias's version does not load (or smoke-score),
the service serves the last version that loaded (the registry's ``last_good_version.<alias>`` tag,
then earlier champions; ``registry.aliases.fallback_candidates``) and reports ``degraded`` with the
reason until the alias points at a loadable version again. After loading the alias's version the
service records it as the last good one, so every replica falls back to the same version.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import torch

from models.exploration import ExplorationPolicy
from recloop.experiments import parse_rerank
from recloop.features import fresh_item_ids
from recloop.policy import DEFAULT_POLICY, EventPolicy
from recloop.settings import Settings, configure_environment, get_settings, online_history_len
from serving.recommender import (
    ExperimentArms,
    RecommenderCore,
    ServedModel,
    attach_catalogue,
    attach_short_history,
    build_served,
    short_history_weight,
)
from serving.schemas import ModelInfo

logger = logging.getLogger(__name__)


@dataclass
class Catalogue:
    """What the service reads from the lake: titles, popularity and each user's lake history."""

    titles: dict[str, str] = field(default_factory=dict)
    popularity: dict[str, float] = field(default_factory=dict)
    base_history: dict[str, tuple[list[str], Any]] = field(default_factory=dict)
    consumed: dict[str, frozenset[str]] = field(default_factory=dict)
    #: user_id -> {item_id: suppressed until (UTC)}: the lake's negatives still within the policy's time
    suppressed: dict[str, dict[str, datetime]] = field(default_factory=dict)
    #: item_id -> genres (the ``genres`` filter of recommend)
    genres: dict[str, list[str]] = field(default_factory=dict)
    #: items added to the catalogue in the last ``freshness_days`` before the data's newest timestamp
    fresh: frozenset[str] = frozenset()
    #: user_id -> {item_id: event type of the user's newest positive on it} (explanations' verb)
    event_types: dict[str, dict[str, str]] = field(default_factory=dict)


def load_catalogue(lake_path: Path, max_seq_len: int, policy: EventPolicy | None = None,
                   now: datetime | None = None, freshness_days: float = 30.0) -> Catalogue:
    """Item titles, event counts and per-user lake histories from the lake (empty when absent).

    Histories, "seen" sets and popularity hold the event policy's positives only (``recloop.policy``);
    the lake's negatives received within ``policy.suppress_s`` of ``now`` are ``suppressed``.
    ``base_history[user_id]`` is (the user's last ``max_seq_len`` positive item ids, oldest first, in
    the contract's history order; the newest ``received_at`` of the user's lake events): the feedback
    path appends the event log's events received after it.
    ``fresh``: items whose ``created_at`` (else first event time) lies within ``freshness_days`` before
    the data's newest event timestamp (``models.metrics.fresh_items``'s rule), not before today.
    """
    import pyarrow

    from recloop.lake import Lake

    policy = policy or DEFAULT_POLICY
    now = now or datetime.now(UTC)
    cat = Catalogue()
    lake = Lake(lake_path)  # committed batches only; latest version of each item
    try:
        items = lake.items()
        if len(items):
            cat.titles = dict(zip(items["item_id"].astype(str), items["title"].astype(str), strict=True))
            cat.genres = {str(i): [str(g) for g in gs] for i, gs in zip(items["item_id"], items["genres"], strict=True)
                          if gs is not None and len(gs)}
        events = lake.events()  # ordered by (received_at, ingest order): the contract's history order
        cat.fresh = fresh_item_ids(events, items, freshness_days)
        roles = policy.roles(events["event_type"], events["value"])
        last_ts = events.groupby("user_id", sort=False)["received_at"].max()  # the log tail starts after it
        negatives = events[(roles == "negative") & (events["received_at"] > now - timedelta(seconds=policy.suppress_s))]
        for (user_id, item_id), received in negatives.groupby(["user_id", "item_id"], sort=False)["received_at"]:
            until = received.max().to_pydatetime() + timedelta(seconds=policy.suppress_s)
            cat.suppressed.setdefault(str(user_id), {})[str(item_id)] = until
        events = events[roles == "positive"]
        last_type = events.groupby(["user_id", "item_id"], sort=False)["event_type"].last()
        for (user_id, item_id), kind in last_type.items():
            cat.event_types.setdefault(str(user_id), {})[str(item_id)] = str(kind)
        cat.popularity = {str(k): float(v) for k, v in events["item_id"].value_counts().items()}
        tail = events.groupby("user_id", sort=False).tail(max_seq_len)
        # "Seen" is everything the user consumed, not only the model's window (exclude_seen masks it all).
        cat.consumed = {str(u): frozenset(g.astype(str)) for u, g in events.groupby("user_id", sort=False)["item_id"]}
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
    alias_version: str | None = None  # the alias's version at start (None: pinned, or no alias)
    alias_error: str | None = None  # why the alias's version is not the one served (a fallback), else None
    experiments: Any = None  # recloop.experiments.ExperimentStore: the shared online-experiment definition
    genres: dict[str, list[str]] = field(default_factory=dict)  # the lake catalogue's item genres
    fresh: frozenset[str] = frozenset()  # the lake catalogue's fresh items
    #: the lake snapshot's per-user windows: the short-history blend's neighbours (``attach_short_history``)
    sequences: list[list[str]] = field(default_factory=list)


def served_from_registry(rt_settings: Settings, client: Any, version: str | None,
                         titles: dict[str, str], popularity: dict[str, float],
                         sequences: list[list[str]] | None = None) -> ServedModel:
    """Load a registered version (or the alias when ``version`` is None) and prepare it (smoke-scored).

    Users with 1-2 known items get the neighbours-plus-popularity blend when the version's evaluation chose
    it (its ``short_history.*`` tags; ``serving.recommender.short_history_weight``), with neighbours from
    ``sequences`` (the lake snapshot's windows); without the tags or sequences the model serves them.
    """
    from registry.store import load_version

    if version is None:
        loaded = load_version(rt_settings.model_name, alias=rt_settings.model_alias, client=client)
    else:
        loaded = load_version(rt_settings.model_name, version=version, client=client)
    served = build_served(
        loaded.model, loaded.vocab, loaded.version, loaded.run_id, loaded.extra,
        titles=titles or None, popularity=popularity or None,
    )
    return attach_short_history(served, sequences or [], short_history_weight(getattr(loaded, "tags", None)))


def lake_windows(base_history: dict[str, tuple[list[str], Any]], max_len: int | None = None) -> list[list[str]]:
    """The lake snapshot's per-user windows (``Catalogue.base_history``), the blend's co-occurrence data; with
    ``max_len``, the last ``max_len`` items of each (the blend's windows stay ``settings.max_seq_len`` long when
    the served history is longer)."""
    return [list(items)[-max_len:] if max_len else list(items) for items, _ in base_history.values()]


def served_history_len(settings: Settings, *served: ServedModel | None) -> int:
    """Items of history serving keeps per user for the models in ``served`` (the champion, an online
    experiment's arms; None entries skipped): ``recloop.settings.online_history_len`` over
    ``settings.max_seq_len`` and each model's ``seq_len`` (its ``config.max_seq_len``)."""
    return online_history_len(settings.max_seq_len, [m.seq_len for m in served if m is not None])


def fit_history(settings: Settings, cat: Catalogue, loaded_len: int, *served: ServedModel | None
                ) -> tuple[Catalogue, int]:
    """The catalogue and the history length to serve ``served`` with (``served_history_len``).

    ``cat``'s per-user lake windows hold up to ``loaded_len`` items; when the models need more (a tuned
    ``max_seq_len`` above ``settings.max_seq_len``), the lake is read again at the longer length, so such a
    model receives its whole window from the lake snapshot and the event-log tail read after it.

    Returns:
        (catalogue whose windows hold at least the returned length, history length in items).
    """
    history_len = served_history_len(settings, *served)
    if history_len > loaded_len:
        logger.info("served history follows the model history_len=%d settings_max_seq_len=%d",
                    history_len, settings.max_seq_len)
        cat = load_catalogue(settings.lake_path, history_len, settings.event_policy,
                             freshness_days=settings.freshness_days)
    return cat, history_len


def _describe(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:500]


def _record_last_good(rt_settings: Settings, client: Any, version: str) -> None:
    """Tag ``version`` as the alias's last good version; a registry write failure never stops serving."""
    from registry.aliases import record_last_good

    try:
        record_last_good(client, rt_settings.model_name, rt_settings.model_alias, version)
    except Exception as err:  # noqa: BLE001 - bookkeeping only
        logger.warning("last good version not recorded version=%s error=%s", version, _describe(err))


def load_champion(rt_settings: Settings, client: Any, titles: dict[str, str], popularity: dict[str, float],
                  genres: dict[str, list[str]] | None = None, fresh: frozenset[str] | None = None,
                  sequences: list[list[str]] | None = None) -> tuple[ServedModel, str | None, str | None]:
    """Load the alias's version, falling back to the last good one when it does not load.

    Returns:
        (served model, the alias's version or None, why the alias's version is not served or None).
        On success the version is recorded as ``last_good_version.<alias>``.
    Raises:
        LookupError: no alias and nothing to fall back to.
        RuntimeError: neither the alias's version nor any fallback loads.
    """
    from registry.aliases import fallback_candidates, get_alias_version

    name, alias = rt_settings.model_name, rt_settings.model_alias
    version = get_alias_version(client, name, alias)
    if version is None:
        alias_error = f"registered model {name!r} has no {alias!r} alias"
    else:
        try:
            served = attach_catalogue(served_from_registry(rt_settings, client, version, titles, popularity,
                                                           sequences), genres, fresh)
        except Exception as err:  # noqa: BLE001 - any load or smoke failure: try the fallbacks
            alias_error = f"version {version} failed to load: {_describe(err)}"
            logger.error("alias version does not load model=%s alias=%s version=%s error=%s", name, alias,
                         version, alias_error)
        else:
            _record_last_good(rt_settings, client, served.version)
            return served, version, None
    failures = []
    for candidate in fallback_candidates(client, name, alias, exclude=[version]):
        try:
            served = attach_catalogue(served_from_registry(rt_settings, client, candidate, titles, popularity,
                                                           sequences), genres, fresh)
        except Exception as err:  # noqa: BLE001
            failures.append(f"version {candidate}: {_describe(err)}")
            continue
        logger.warning("serving fallback model=%s alias=%s alias_version=%s served=%s reason=%s", name, alias,
                       version, served.version, alias_error)
        return served, version, alias_error
    if version is None and not failures:
        raise LookupError(alias_error)
    raise RuntimeError(f"no loadable version of {name!r}: {alias_error}; fallbacks: {failures or 'none'}")


def build_runtime(settings: Settings | None = None, *, online: Any = None, events: Any = None,
                  exposures: Any = None, experiments: Any = None, blocklist: Any = None) -> Runtime:
    """Connect to MLflow, the event log and the online store; load the champion (or its fallback).

    Args:
        settings: defaults to ``get_settings()``.
        online: the online store (default ``featurestore.online.OnlineFeatures``); tests pass a fake.
        events: the event log (default ``recloop.eventlog.EventLog`` on ``settings.event_log_uri``).
        exposures: the exposure sink (default ``recloop.exposures.ExposureLog`` on the same database
            when ``settings.exposure_log``).
        experiments: the online-experiment store (default ``recloop.experiments.ExperimentStore`` on the
            same database); ``ChampionWatcher.poll_experiment`` routes by it.
        blocklist: the catalogue-wide blocklist (default ``recloop.blocklist.CachedBlocklist`` over the
            same database, re-read every ``settings.blocklist_ttl_s``).
    Raises:
        LookupError: the registered model has no ``settings.model_alias`` alias and no last good version.
        RuntimeError: nothing loads (the alias's version, the last good one, earlier champions).
    """
    configure_environment()
    torch.set_num_threads(1)  # one request = one tiny forward pass; threads only add contention
    settings = settings or get_settings()
    from registry.tracking import configure_tracking

    client = configure_tracking(settings)
    cat = load_catalogue(settings.lake_path, settings.max_seq_len, settings.event_policy,
                         freshness_days=settings.freshness_days)
    titles, popularity = cat.titles, cat.popularity
    sequences = lake_windows(cat.base_history)  # at settings.max_seq_len, read before the model is known
    alias_version = alias_error = None
    if settings.serve_model_version:  # a pinned deployment serves exactly its version, or fails
        served = attach_catalogue(served_from_registry(settings, client, settings.serve_model_version, titles,
                                                       popularity, sequences), cat.genres, cat.fresh)
    else:
        served, alias_version, alias_error = load_champion(settings, client, titles, popularity, cat.genres,
                                                           cat.fresh, sequences)
    cat, history_len = fit_history(settings, cat, settings.max_seq_len, served)  # a longer model: longer histories
    if online is None:
        from featurestore.online import OnlineFeatures

        online = OnlineFeatures(settings=settings)
    if events is None:
        from recloop.eventlog import EventLog

        events = EventLog(settings.event_log_uri)
        events.policy = settings.event_policy
    core = RecommenderCore(
        served, online, events,
        max_seq_len=history_len, variant=settings.model_alias, base_history=cat.base_history,
        consumed=cat.consumed, suppressed=cat.suppressed, policy=settings.event_policy,
        exposures=exposures if exposures is not None else _exposure_log(settings),
        exploration=ExplorationPolicy.parse(settings.exploration),
        blocklist=blocklist if blocklist is not None else _blocklist(settings),
        rerank_default=settings.rerank_default, rerank_candidates=settings.rerank_candidates,
        freshness_boost=settings.freshness_boost, event_types=cat.event_types,
    )
    core.tombstones = _tombstones(settings)  # forgotten users are unknown on every worker at once
    # Re-sync an empty online store now (a Redis that restarted empty), then retry failed pushes and
    # watch for an emptied store in a daemon thread (serving/recommender.py, "Online-store outages").
    core.text, core.query_weight = _text_catalog(settings), settings.query_weight  # new items, text queries
    core.start_online_sync(settings.online_check_interval_s)
    logger.info("service ready model=%s version=%s degraded=%s", settings.model_name, served.version,
                alias_error)
    if experiments is None:
        from recloop.experiments import ExperimentStore

        experiments = ExperimentStore(settings.event_log_uri)
    return Runtime(settings, client, core, titles, popularity, alias_version, alias_error, experiments,
                   cat.genres, cat.fresh, sequences)


def _tombstones(settings: Settings) -> Any:
    """Forgotten users as a serving worker checks them: one indexed read of the shared table per request."""
    from recloop.forget import ForgetStore, TombstoneCheck, user_hasher

    return TombstoneCheck(ForgetStore(settings.event_log_uri), lambda: user_hasher(settings))


def _text_catalog(settings: Settings) -> Any:
    """New catalogue items and text queries of one worker (``serving.catalog.TextCatalog``): the shared
    ``catalog_items`` table behind a TTL cache, the packaged encoder behind the embedding cache (loaded on the
    first new item or query), and the lake's item texts (queries against an ID-only model)."""
    from featurestore.materialize import load_text_encoder
    from featurestore.text import QueryEncoder, embedding_cache_path
    from recloop.catalog import CachedCatalog, CatalogStore
    from serving.catalog import TextCatalog

    lake_items = None
    try:
        from recloop.lake import Lake

        lake_items = Lake(settings.lake_path).items()
    except Exception as err:  # noqa: BLE001 - queries against an ID-only model then find no lake texts
        logger.warning("lake items not read for queries error=%s", err)
    catalog = CachedCatalog(CatalogStore(settings.event_log_uri), ttl_s=settings.catalog_ttl_s)
    cache = embedding_cache_path(settings.home)
    return TextCatalog(catalog, lambda: load_text_encoder(cache_path=cache),
                       QueryEncoder(load_text_encoder, settings.query_cache_size), lake_items)


def _blocklist(settings: Settings) -> Any:
    """The catalogue-wide blocklist as a serving worker reads it: the shared table behind a TTL cache."""
    from recloop.blocklist import BlocklistStore, CachedBlocklist

    return CachedBlocklist(BlocklistStore(settings.event_log_uri), ttl_s=settings.blocklist_ttl_s)


def _exposure_log(settings: Settings) -> Any:
    """The exposure log of ``settings`` (None when ``exposure_log`` is off): batched, off the request path."""
    if not settings.exposure_log:
        return None
    from recloop.exposures import ExposureLog

    return ExposureLog(settings.event_log_uri, flush_interval_s=settings.exposure_flush_ms / 1000.0,
                       max_queue=settings.exposure_queue_max)


def _online_reasons(status: Any) -> list[str]:
    """Degraded reasons from ``RecommenderCore.online_status()`` (a mapping or an object), if it has one."""
    def get(key: str) -> Any:
        return status.get(key) if isinstance(status, dict) else getattr(status, key, None)

    reasons = []
    if get("reachable") is False or get("unreachable") is True:
        reasons.append("online store unreachable")
    if get("empty") is True or get("online_store_empty") is True:
        reasons.append("online store empty")
    pending = get("pending_pushes")
    if isinstance(pending, int) and not isinstance(pending, bool) and pending > 0:
        reasons.append(f"{pending} online pushes pending")
    if get("resyncing") is True:
        reasons.append("online store re-sync running")
    return reasons


class ChampionWatcher:
    """Polls the registry alias and swaps in a new champion: load, smoke-score, one assignment.

    Also the service's health verdict (``status``): ``degraded`` while the alias points at a version
    that failed to load (the last good version keeps serving; the failed version is retried with a
    back-off up to ``MAX_RETRY_S``), while the registry or a store is unreachable.
    """

    MAX_RETRY_S = 300.0

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.last_poll_at: str | None = None
        self.last_error: str | None = runtime.alias_error
        self.alias_version: str | None = runtime.alias_version
        #: why the served version is not the alias's (the alias's version failed to load), else None
        self.alias_problem: str | None = runtime.alias_error
        self.registry_error: str | None = None
        self._failed_version: str | None = runtime.alias_version if runtime.alias_error else None
        self._failures = 1 if self._failed_version else 0
        self._retry_at = time.monotonic() + self._backoff() if self._failed_version else 0.0
        self._stop = threading.Event()
        #: why the running online experiment is not served (its arms failed to load), else None
        self.experiment_error: str | None = None
        self._failed_experiment: str | None = None
        self._experiment_retry_at = 0.0

    @property
    def model_loaded(self) -> bool:
        return self.rt.core.served is not None

    def _backoff(self) -> float:
        return min(self.rt.settings.serve_poll_interval_s * 2 ** self._failures, self.MAX_RETRY_S)

    def poll_once(self) -> bool:
        """Check the alias once; returns True when a new version was swapped in.

        A failure (registry unreachable, broken artifact, smoke score) is logged and kept in
        ``last_error``; the current model keeps serving. A version that failed to load is retried
        after a back-off (doubling from the poll interval up to ``MAX_RETRY_S``), not on every poll.
        """
        from registry.aliases import get_alias_version

        s = self.rt.settings
        self.last_poll_at = datetime.now(UTC).isoformat()
        if s.serve_model_version:  # a pinned deployment never follows the alias
            return False
        served_version = self.rt.core.served.version
        try:
            version = get_alias_version(self.rt.client, s.model_name, s.model_alias)
        except Exception as err:  # noqa: BLE001 - the registry may be down; keep serving
            self.registry_error = self.last_error = _describe(err)
            logger.error("champion poll failed; keeping version=%s error=%s", served_version, self.last_error)
            return False
        self.registry_error = None
        self.alias_version = version
        if version is None:
            self.alias_problem = f"registered model {s.model_name!r} has no {s.model_alias!r} alias"
            return False
        if version == served_version:
            self.alias_problem = self._failed_version = None
            self._failures = 0
            return False
        if version == self._failed_version and time.monotonic() < self._retry_at:
            return False
        try:
            # A new version may know new items: refresh titles and popularity from the lake first.
            loaded_len = max(self.rt.core.max_seq_len, s.max_seq_len)
            cat = load_catalogue(s.lake_path, loaded_len, s.event_policy, freshness_days=s.freshness_days)
            self.rt.titles, self.rt.popularity = cat.titles, cat.popularity
            self.rt.genres, self.rt.fresh = cat.genres, cat.fresh
            self.rt.sequences = lake_windows(cat.base_history, s.max_seq_len)
            served = attach_catalogue(served_from_registry(s, self.rt.client, version, self.rt.titles,
                                                           self.rt.popularity, self.rt.sequences),
                                      self.rt.genres, self.rt.fresh)
            arms = self.rt.core.experiment_arms  # its pinned models read the same histories
            # the history follows the served models: a longer max_seq_len re-reads longer lake windows
            cat, history_len = fit_history(s, cat, loaded_len, served,
                                           *((arms.champion, arms.challenger) if arms is not None else ()))
        except Exception as err:  # noqa: BLE001 - any load failure must keep the old model serving
            self.last_error = _describe(err)
            self._failures = self._failures + 1 if version == self._failed_version else 1
            self._failed_version = version
            self._retry_at = time.monotonic() + self._backoff()
            self.alias_problem = f"version {version} failed to load: {self.last_error}"
            logger.error("champion reload failed; keeping version=%s error=%s", served_version, self.last_error)
            return False
        self.rt.core.base_history = cat.base_history  # one reference assignment, like the model swap
        self.rt.core.consumed = cat.consumed
        self.rt.core.suppressed = cat.suppressed
        self.rt.core.event_types = cat.event_types
        self.rt.core.max_seq_len = history_len
        self.rt.core.swap(served)
        self.last_error = self.alias_problem = self._failed_version = None
        self._failures = 0
        _record_last_good(s, self.rt.client, served.version)
        return True

    def poll_experiment(self) -> bool:
        """Pick up the start or stop of an online experiment from the shared store (every worker and
        replica polls it with the alias, so all route alike within ``serve_poll_interval_s``).

        On start both arms are loaded at their pinned versions (the served model is reused when it is
        one of them) and swapped in as one reference; on stop the reference is cleared and the champion
        serves alone. A load failure keeps the current routing, is reported by ``status`` and retried
        after ``serve_poll_interval_s``. Returns True when the routing changed.
        """
        store = self.rt.experiments
        if store is None:
            return False
        core = self.rt.core
        try:
            exp = store.active()
        except Exception as err:  # noqa: BLE001 - the store may be down; keep the current routing
            self.experiment_error = _describe(err)
            logger.warning("online experiment poll failed: %s", self.experiment_error)
            return False
        current = core.experiment_arms
        if exp is None:
            self.experiment_error = self._failed_experiment = None
            if current is None:
                return False
            core.experiment_arms = None
            logger.info("online experiment %s ended: serving the champion alone", current.experiment_id)
            return True
        if current is not None and current.experiment_id == exp.experiment_id:
            return False
        if exp.experiment_id == self._failed_experiment and time.monotonic() < self._experiment_retry_at:
            return False
        try:
            exploration = tuple(None if text is None else ExplorationPolicy.parse(text)
                                for text in getattr(exp, "exploration", (None, None)))
            rerank = tuple(None if text is None else parse_rerank(text)
                           for text in getattr(exp, "rerank", (None, None)))
            arms = ExperimentArms(exp.experiment_id, exp.mode, (float(exp.weights[0]), float(exp.weights[1])),
                                  exp.salt, self._pinned(exp.champion_version), self._pinned(exp.challenger_version),
                                  exploration, rerank)
            self._grow_history(arms.champion, arms.challenger)  # an arm reading more: longer histories first
        except Exception as err:  # noqa: BLE001 - an arm that does not load never takes traffic
            self.experiment_error = f"online experiment {exp.experiment_id} not served: {_describe(err)}"
            self._failed_experiment = exp.experiment_id
            self._experiment_retry_at = time.monotonic() + self.rt.settings.serve_poll_interval_s
            logger.error(self.experiment_error)
            return False
        core.experiment_arms = arms
        self.experiment_error = self._failed_experiment = None
        logger.info("online experiment %s started: %s", exp.experiment_id, arms.describe())
        return True

    def _grow_history(self, *served: ServedModel) -> None:
        """Lengthen the core's history (lake windows, log tail, pushes) when ``served`` (an experiment's arms)
        reads more than it keeps now. It never shrinks here: a longer history is harmless (each model keeps its
        last ``max_seq_len`` items), and the next alias swap sets it from the served models again."""
        core, s = self.rt.core, self.rt.settings
        history_len = online_history_len(core.max_seq_len, [m.seq_len for m in served])
        if history_len > core.max_seq_len:
            cat, history_len = fit_history(s, Catalogue(), core.max_seq_len, *served)
            core.base_history, core.consumed = cat.base_history, cat.consumed
            core.suppressed, core.event_types = cat.suppressed, cat.event_types
            core.max_seq_len = history_len

    def _pinned(self, version: str) -> ServedModel:
        """The served model of registry ``version`` (the current one when it is that version)."""
        served = self.rt.core.served
        if served.version == str(version):
            return served
        return attach_catalogue(served_from_registry(self.rt.settings, self.rt.client, str(version), self.rt.titles,
                                                     self.rt.popularity, self.rt.sequences),
                                self.rt.genres, self.rt.fresh)

    def status(self, event_log: bool = True, online_store: bool = True, online: Any = None
               ) -> tuple[Literal["ok", "degraded"], str | None]:
        """``("ok", None)`` or ``("degraded", "<reasons>")`` for ``/ready``.

        Degraded while the served version is not the alias's because the alias's failed to load
        (or the alias is gone), while the registry is unreachable, while the event log
        (``event_log=False``) or the online store is unreachable, and on the online store's own
        signals: ``online`` (the result of ``RecommenderCore.online_status()``, read by the caller),
        else that method's answer when the core has it (unreachable, empty, pending pushes, re-sync).
        """
        reasons = []
        served = self.rt.core.served
        if self.alias_problem and not self.rt.settings.serve_model_version:
            reasons.append(f"alias {self.rt.settings.model_alias!r} -> {self.alias_version or 'none'}: "
                           f"{self.alias_problem}; serving last good version {served.version}")
        if self.registry_error:
            reasons.append(f"model registry unreachable: {self.registry_error}")
        if self.experiment_error:
            reasons.append(self.experiment_error)
        if not event_log:
            reasons.append("event log unreachable")
        if not online_store:
            reasons.append("online store unreachable")
        if online is None and hasattr(self.rt.core, "online_status"):
            try:
                online = self.rt.core.online_status()
            except Exception as err:  # noqa: BLE001 - a health probe must not raise
                reasons.append(f"online store status unknown: {_describe(err)}")
        if online is not None:
            reasons.extend(r for r in _online_reasons(online) if r not in reasons)
        return ("degraded", "; ".join(reasons)) if reasons else ("ok", None)

    def run_forever(self) -> None:
        """Poll every ``settings.serve_poll_interval_s`` until ``stop()`` (daemon thread body)."""
        while not self._stop.wait(self.rt.settings.serve_poll_interval_s):
            self.poll_once()
            self.poll_experiment()
            self.sweep_forgotten()

    def sweep_forgotten(self) -> int:
        """``RecommenderCore.sweep_forgotten``: users forgotten through another worker leave this one's memory
        within one poll interval. A failed read is logged and retried at the next poll."""
        try:
            return self.rt.core.sweep_forgotten()
        except Exception as err:  # noqa: BLE001 - the poll thread must survive a database outage
            logger.warning("forgotten-user sweep failed; retried next poll error=%s", err)
            return 0

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
            experiment=arms.describe() if (arms := self.rt.core.experiment_arms) is not None else None,
            text=text.status(served) if (text := getattr(self.rt.core, "text", None)) is not None else None,
        )
