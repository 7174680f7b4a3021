"""The Feast store as serving sees it: one store per process, online reads and the feedback push.

The ``RepoConfig`` is built here in Python from ``Settings`` (not read from feature_store.yaml) so
every path follows ``RECLOOP_HOME`` and the online store follows ``RECLOOP_ONLINE_STORE`` /
``RECLOOP_PROFILE`` without templating files. ``feature_repo/feature_store.yaml`` (SQLite) and
``feature_store.redis.yaml`` describe the same stores for the ``feast`` CLI; a test keeps them equal.

The store's ``repo_path`` is the recloop home: the repo's FileSources use relative paths
(``features/*.parquet``), which Feast resolves against it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from feast import FeatureStore, RepoConfig
from feast.data_source import PushMode
from feast.errors import FeatureServiceNotFoundException
from filelock import FileLock

from recloop.settings import Settings, get_settings

logger = logging.getLogger(__name__)

RECENT_ITEMS_VIEW = "user_recent_items"
RECENT_ITEMS_FEATURE = "recent_item_ids"
RECENT_ITEMS_PUSH = "user_recent_items_push"
REGISTRY_CACHE_TTL_S = 60  # serving re-reads the SQL registry at most once a minute


def online_store_kind(settings: Settings) -> str:
    """``"redis"`` when ``online_store=redis`` or the prod profile, else ``"sqlite"``."""
    return "redis" if settings.online_store == "redis" or settings.profile == "prod" else "sqlite"


def feature_store_config(settings: Settings, *, project: str | None = None) -> RepoConfig:
    """The Feast configuration for ``settings``.

    SQL registry on SQLite (``home/feast_registry.db``; survives concurrent applies, unlike the
    file registry), file (dask) offline store over ``home/features/*.parquet``, and SQLite
    (``home/feast_online.db``) or Redis (``settings.redis_url``) online store.
    """
    home = settings.home
    if online_store_kind(settings) == "redis":
        online: dict[str, Any] = {"type": "redis", "connection_string": settings.redis_url}
    else:
        online = {"type": "sqlite", "path": str(home / "feast_online.db")}
    # The same keys as feature_repo/feature_store.yaml, so Feast validates them identically.
    config = RepoConfig(
        project=project or settings.feast_project,
        provider="local",
        registry={
            "registry_type": "sql",
            "path": f"sqlite:///{home / 'feast_registry.db'}",
            "cache_ttl_seconds": REGISTRY_CACHE_TTL_S,
        },
        offline_store={"type": "file"},
        online_store=online,
        entity_key_serialization_version=3,
    )
    config.repo_path = home
    return config


@contextmanager
def registry_lock(home: Path) -> Iterator[None]:
    """An exclusive lock on ``home``'s Feast registry, across threads and processes (``filelock``).

    Two stores creating the SQL registry's tables at once race ("table projects already exists");
    ``open_feature_store`` and ``featurestore.materialize.apply_repo`` hold this lock while they write.
    """
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / "feast_registry.lock"):
        yield


def open_feature_store(settings: Settings | None = None, *, project: str | None = None) -> FeatureStore:
    """A ``FeatureStore`` over ``settings``, its registry tables created (under the registry lock).

    Creates ``home/features`` if missing. Keep one store per process.
    """
    settings = settings or get_settings()
    (settings.home / "features").mkdir(parents=True, exist_ok=True)
    store = FeatureStore(config=feature_store_config(settings, project=project), repo_path=str(settings.home))
    with registry_lock(settings.home):
        _ = store.registry  # creates the SQL registry's tables on first use
    return store


@dataclass(frozen=True)
class UserState:
    """A user's online features. ``stale``: older than the freshness limit (values then unused)."""

    recent_item_ids: list[str] | None
    stats: dict[str, Any] | None
    event_ts: datetime | None
    stale: bool


class OnlineFeatures:
    """Fast online reads of the feature service's user views, and the real-time push.

    Feast does not apply a view's TTL to online reads, so recloop does: a row whose event
    timestamp is older than ``freshness_s`` reads as missing (``None``).

    Args:
        store: an open store (default: ``open_feature_store(settings)``); kept for the process.
        settings: defaults to ``get_settings()``.
        freshness_s: max age of an online row in seconds (default ``settings.online_freshness_s``;
            ``math.inf`` disables the check).
        clock: returns the current UTC time (tests pass a fixed clock).
    Raises:
        KeyError: the feature service ``settings.feature_service`` is not registered (apply first).
    """

    def __init__(
        self,
        store: FeatureStore | None = None,
        *,
        settings: Settings | None = None,
        freshness_s: float | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        settings = settings or get_settings()
        self.store = store or open_feature_store(settings)
        self.freshness_s = settings.online_freshness_s if freshness_s is None else freshness_s
        self.clock = clock
        self.service_name = settings.feature_service
        self.user_refs, self.item_refs = self._refs_by_entity()

    def _refs_by_entity(self) -> tuple[list[str], list[str]]:
        try:
            service = self.store.get_feature_service(self.service_name)
        except FeatureServiceNotFoundException as err:
            raise KeyError(
                f"feature service {self.service_name!r} not registered; run the features flow"
            ) from err
        user_refs: list[str] = []
        item_refs: list[str] = []
        for proj in service.feature_view_projections:
            view = self.store.get_feature_view(proj.name)
            refs = [f"{proj.name}:{f.name}" for f in proj.features]
            (user_refs if "user" in view.entities else item_refs).extend(refs)
        if f"{RECENT_ITEMS_VIEW}:{RECENT_ITEMS_FEATURE}" not in user_refs:
            raise KeyError(
                f"feature service {self.service_name!r} lacks {RECENT_ITEMS_VIEW}:{RECENT_ITEMS_FEATURE}"
            )
        return user_refs, item_refs

    def _is_stale(self, event_ts_s: int) -> bool:
        if math.isinf(self.freshness_s):
            return False
        return self.clock().timestamp() - event_ts_s > self.freshness_s

    def user(self, user_id: str) -> UserState:
        """All user features of the service in one online read (about a millisecond).

        Returns:
            ``UserState``; fields are ``None`` when the user is unknown or the row is stale.
        """
        row = self.store.get_online_features(
            features=self.user_refs, entity_rows=[{"user_id": str(user_id)}], full_feature_names=True
        ).to_dict(include_event_timestamps=True)
        ref = f"{RECENT_ITEMS_VIEW}__{RECENT_ITEMS_FEATURE}"
        items, items_ts = row[ref][0], row[ref + "__ts"][0]
        stats = {
            k.split("__", 1)[1]: v[0]
            for k, v in row.items()
            if k.startswith("user_stats__") and not k.endswith("__ts")
        }
        stats_ts = max(
            (v[0] for k, v in row.items() if k.startswith("user_stats__") and k.endswith("__ts")), default=0
        )
        known_items = items is not None and items_ts > 0
        known_stats = stats_ts > 0 and any(v is not None for v in stats.values())
        stale = (known_items and self._is_stale(items_ts)) or (known_stats and self._is_stale(stats_ts))
        return UserState(
            recent_item_ids=[str(x) for x in items] if known_items and not self._is_stale(items_ts) else None,
            stats=stats if known_stats and not self._is_stale(stats_ts) else None,
            event_ts=datetime.fromtimestamp(items_ts, UTC) if known_items else None,
            stale=stale,
        )

    def recent_items(self, user_id: str) -> list[str] | None:
        """The user's last item ids, oldest first; ``None`` if unknown or stale; ``[]`` if pushed empty."""
        return self.user(user_id).recent_item_ids

    def user_stats(self, user_id: str) -> dict[str, Any] | None:
        """``n_events``, ``n_distinct_items``, ``last_event_ts``, ``mean_rating``; None if unknown/stale."""
        return self.user(user_id).stats

    def push_recent_items(self, user_id: str, items: list[str], event_ts: datetime) -> bool:
        """Write the user's new recent-items list to the online store (the feedback path).

        The caller derives ``items`` from the authoritative event log (one writer per user):
        read-append-push through Feast loses concurrent updates (docs/stack-notes.md). A push older
        than the stored row is skipped, because the SQLite online store would let it overwrite a
        newer value (Redis would not); the check-then-write is not atomic.

        Args:
            user_id: raw user id.
            items: item ids, oldest first (may be empty).
            event_ts: tz-aware UTC time of the newest event the list reflects.
        Returns:
            True if written, False if skipped as older than the stored row.
        Raises:
            ValueError: ``event_ts`` is naive.
        """
        if event_ts.tzinfo is None:
            raise ValueError(f"event_ts={event_ts!r} must be timezone-aware (UTC)")
        current = self.store.get_online_features(
            features=[f"{RECENT_ITEMS_VIEW}:{RECENT_ITEMS_FEATURE}"], entity_rows=[{"user_id": str(user_id)}]
        ).to_dict(include_event_timestamps=True)
        if current[RECENT_ITEMS_FEATURE + "__ts"][0] > int(event_ts.timestamp()):
            logger.info("push skipped: older than stored row user_id=%s", user_id)
            return False
        df = pd.DataFrame(
            {
                "user_id": [str(user_id)],
                RECENT_ITEMS_FEATURE: [[str(i) for i in items]],
                "event_ts": [pd.Timestamp(event_ts).tz_convert("UTC")],
                "created_ts": [pd.Timestamp(self.clock()).tz_convert("UTC")],
            }
        )
        self.store.push(RECENT_ITEMS_PUSH, df, to=PushMode.ONLINE)
        return True

    def item_features(self, item_ids: list[str]) -> pd.DataFrame:
        """Item features of the service (stats and content) for ``item_ids``, one row each, in order."""
        resp = self.store.get_online_features(
            features=self.item_refs,
            entity_rows=[{"item_id": str(i)} for i in item_ids],
            full_feature_names=True,
        )
        return resp.to_df()


def time_reads(features: OnlineFeatures, user_ids: list[str]) -> list[float]:
    """Wall time in milliseconds of one ``recent_items`` call per user id (for benchmarks)."""
    out = []
    for uid in user_ids:
        t0 = time.perf_counter()
        features.recent_items(uid)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out
