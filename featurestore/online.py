"""The Feast store as serving sees it: one store per process, online reads and the feedback push.

The ``RepoConfig`` is built here in Python from ``Settings`` (not read from feature_store.yaml) so
every path follows ``RECLOOP_HOME`` and the online store follows ``RECLOOP_ONLINE_STORE`` /
``RECLOOP_PROFILE`` without templating files. ``feature_repo/feature_store.yaml`` (SQLite) and
``feature_store.redis.yaml`` describe the same stores for the ``feast`` CLI; a test keeps them equal.

The store's ``repo_path`` is the recloop home: the repo's FileSources use relative paths
(``features/*.parquet``), which Feast resolves against it.

Outages: every online call of ``OnlineFeatures`` runs under a deadline (``settings.online_timeout_ms``
for reads, ``online_write_timeout_ms`` for pushes) and behind a circuit breaker: after a failure the
store is skipped for ``online_breaker_s`` and calls raise ``OnlineStoreUnavailable`` at once, so a
dead or frozen Redis costs one timeout, not one per request. The Redis client gets socket timeouts
and no retries (redis-py's default retries with back-off hung a call 4-10 s; docs/stack-notes.md).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
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

from recloop.forget import log_id
from recloop.settings import Settings, get_settings

logger = logging.getLogger(__name__)

RECENT_ITEMS_VIEW = "user_recent_items"
RECENT_ITEMS_FEATURE = "recent_item_ids"
RECENT_ITEMS_PUSH = "user_recent_items_push"
REGISTRY_CACHE_TTL_S = 60  # serving re-reads the SQL registry at most once a minute
WARMUP_USER = "__recloop_warmup__"  # a user id no client sends
PUSH_CHUNK_ROWS = 1000  # rows per Feast push in ``push_many`` (1,000 rows take about 0.15 s on Redis)
WARMUP_TIMEOUT_S = 10.0  # the first read of a process loads Feast's lazies (about 0.2 s)
MAX_IN_FLIGHT = 8  # online calls running at once; a store that holds them all is treated as down


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


class OnlineStoreUnavailable(ConnectionError):
    """The online store failed, did not answer within its deadline, or is skipped (circuit open)."""


class CallGuard:
    """A deadline per call and a circuit breaker around one store (thread-safe).

    ``call`` runs the function in a small thread pool and waits at most ``timeout_s``. A call that
    *fails* (raises) opens the circuit for ``breaker_s``: until then every ``call`` raises
    ``OnlineStoreUnavailable`` at once, without touching the store; the first call after that is
    the trial, and a success closes the circuit. A call that is only *slow* fails its caller but
    leaves the circuit as its own outcome decides (a registry refresh may take longer than a read
    deadline; a frozen Redis then fails the call with its socket timeout). When ``max_in_flight``
    calls are still running, the store is treated as down.

    Args:
        timeout_s: default deadline of a call (None: no deadline, the call runs in the caller's thread).
        breaker_s: how long the store is skipped after a failure (0: never skipped).
        max_in_flight: calls allowed to run at once.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        timeout_s: float | None,
        breaker_s: float,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        name: str = "online-store",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s, self.breaker_s, self.max_in_flight = timeout_s, breaker_s, max_in_flight
        self.name, self.clock = name, clock
        self.last_error: str | None = None
        self.failures = 0  # failed calls since the process started
        self._open_until = 0.0
        self._tripped = False
        self._in_flight = 0
        self._mu = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        if timeout_s is not None:
            self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix=name)

    @property
    def circuit_open(self) -> bool:
        """True while calls are skipped after a failure."""
        return self.clock() < self._open_until

    def _trip(self, reason: str) -> None:
        with self._mu:
            first = not self._tripped
            self._tripped = True
            self.failures += 1
            self.last_error = reason[:500]
            self._open_until = self.clock() + self.breaker_s
        log = logger.warning if first else logger.info
        log("%s unavailable; skipped for %.1f s: %s", self.name, self.breaker_s, self.last_error)

    def _succeeded(self) -> None:
        if self._tripped:
            with self._mu:
                was, self._tripped, self._open_until = self._tripped, False, 0.0
            if was:
                logger.warning("%s answers again; circuit closed", self.name)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            out = fn(*args, **kwargs)
        except (ValueError, TypeError):
            raise  # a bad argument, not an outage: the circuit stays as it is
        except Exception as err:
            self._trip(f"{type(err).__name__}: {err}")
            raise
        finally:
            with self._mu:
                self._in_flight -= 1
        self._succeeded()
        return out

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` within the deadline (``timeout_s`` overrides the default).

        Raises:
            OnlineStoreUnavailable: the circuit is open, the call failed (chained), or it did not
                finish in time.
        """
        now = self.clock()
        with self._mu:
            if now < self._open_until:
                raise OnlineStoreUnavailable(
                    f"{self.name} skipped for {self._open_until - now:.1f} s more after: {self.last_error}"
                )
            busy = self._in_flight >= self.max_in_flight
            if not busy:
                self._in_flight += 1
        if busy:
            self._trip(f"{self.max_in_flight} calls still running")
            raise OnlineStoreUnavailable(f"{self.name}: {self.max_in_flight} calls still running")
        deadline = self.timeout_s if timeout_s is None else timeout_s
        try:
            if self._pool is None:
                return self._run(fn, args, kwargs)
            try:
                future = self._pool.submit(self._run, fn, args, kwargs)
            except RuntimeError:  # the pool was shut down (close)
                with self._mu:
                    self._in_flight -= 1
                raise
            done, _ = wait_futures([future], timeout=deadline)
            if not done:
                if future.cancel():  # never started (the pool was saturated): release its slot
                    with self._mu:
                        self._in_flight -= 1
                raise OnlineStoreUnavailable(f"{self.name}: no answer within {deadline * 1000:.0f} ms")
            return future.result()
        except (OnlineStoreUnavailable, ValueError, TypeError):
            raise
        except Exception as err:
            raise OnlineStoreUnavailable(f"{self.name}: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        """Stop the pool's threads (calls still running finish in the background)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def tune_redis_client(store: FeatureStore, socket_timeout_s: float) -> bool:
    """Give the Feast Redis client socket timeouts and no retries (before its first use).

    redis-py's defaults (no socket timeout; 3 retries with exponential back-off) made a read hang
    4-10 s against a dead Redis and forever against a frozen one. Timeouts already given in the
    connection string (``host:port,socket_timeout=0.5``) are kept. Uses Feast's client accessor,
    which is not public API: on any surprise the client is left as it is (the call deadlines of
    ``CallGuard`` still bound the caller).

    Returns:
        True if the client was changed (Redis store), False otherwise.
    """
    if store.config.online_store.type != "redis":
        return False
    try:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = store._get_provider().online_store._get_client(store.config.online_store)
        kwargs = client.connection_pool.connection_kwargs
        for key in ("socket_timeout", "socket_connect_timeout"):
            if kwargs.get(key) is None:
                kwargs[key] = socket_timeout_s
        client.set_retry(Retry(NoBackoff(), 0))
        client.connection_pool.disconnect()  # connections opened before get the new options
    except Exception as err:  # noqa: BLE001 - a best-effort tuning of a private client
        logger.warning("Redis client not tuned (call deadlines still apply): %s", err)
        return False
    return True


class OnlineFeatures:
    """Fast online reads of the feature service's user views, and the real-time push.

    Feast does not apply a view's TTL to online reads, so recloop does: a row whose event
    timestamp is older than ``freshness_s`` reads as missing (``None``).

    Every store call runs under ``CallGuard``: a deadline (``timeout_s`` for reads,
    ``write_timeout_s`` for pushes) and a circuit breaker (``breaker_s``); a failed, late or
    skipped call raises ``OnlineStoreUnavailable``.

    Args:
        store: an open store (default: ``open_feature_store(settings)``); kept for the process.
        settings: defaults to ``get_settings()``.
        freshness_s: max age of an online row in seconds (default ``settings.online_freshness_s``;
            ``math.inf`` disables the check).
        clock: returns the current UTC time (tests pass a fixed clock).
        timeout_s: read deadline in seconds (default ``settings.online_timeout_ms / 1000``;
            ``math.inf``: no deadline, calls run in the caller's thread).
        write_timeout_s: push deadline (default ``settings.online_write_timeout_ms / 1000``).
        breaker_s: how long the store is skipped after a failure (default ``settings.online_breaker_s``).
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
        timeout_s: float | None = None,
        write_timeout_s: float | None = None,
        breaker_s: float | None = None,
    ) -> None:
        settings = settings or get_settings()
        self.store = store or open_feature_store(settings)
        self.freshness_s = settings.online_freshness_s if freshness_s is None else freshness_s
        self.clock = clock
        self.service_name = settings.feature_service
        read_s = settings.online_timeout_ms / 1000.0 if timeout_s is None else timeout_s
        write_s = settings.online_write_timeout_ms / 1000.0 if write_timeout_s is None else write_timeout_s
        self.timeout_s: float | None = None if math.isinf(read_s) else read_s
        self.write_timeout_s: float | None = None if math.isinf(write_s) else write_s
        self.guard = CallGuard(self.timeout_s, settings.online_breaker_s if breaker_s is None else breaker_s)
        # Socket timeouts above the read deadline: a slow answer fails only its caller, a frozen
        # Redis fails the call itself (and opens the circuit) soon after.
        tune_redis_client(self.store, max(2 * (self.timeout_s or 0.25), 0.1))
        self.user_refs, self.item_refs = self._refs_by_entity()
        try:  # the first reads load Feast's lazies (~0.2 s): not on a request's deadline
            self.guard.call(self._read_user, WARMUP_USER, timeout_s=WARMUP_TIMEOUT_S)
            self.guard.call(self._item_response, [WARMUP_USER], timeout_s=WARMUP_TIMEOUT_S)
        except OnlineStoreUnavailable as err:
            logger.warning("online store not reachable at start: %s", err)
        self._stop = threading.Event()
        ttl = getattr(self.store.config.registry, "cache_ttl_seconds", REGISTRY_CACHE_TTL_S) or 0
        if self.timeout_s is not None and ttl > 0:
            # Feast refreshes an expired registry cache inside get_online_features (~10 ms, on a
            # request's deadline); refreshing it every ttl/2 here keeps that off the request path.
            threading.Thread(
                target=self._refresh_registry_every, args=(ttl / 2,), name="feast-registry", daemon=True
            ).start()

    def _refresh_registry_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.store.refresh_registry()
            except Exception as err:  # noqa: BLE001 - Feast refreshes inline again once it expires
                logger.warning("Feast registry not refreshed: %s", err)

    @property
    def circuit_open(self) -> bool:
        """True while the store is skipped after a failure (``CallGuard``)."""
        return self.guard.circuit_open

    @property
    def last_error(self) -> str | None:
        return self.guard.last_error

    def close(self) -> None:
        """Stop the guard's and the registry refresh's threads."""
        self._stop.set()
        self.guard.close()

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
        Raises:
            OnlineStoreUnavailable: the store failed, was late or is skipped.
        """
        return self.guard.call(self._read_user, user_id)

    def _read_user(self, user_id: str) -> UserState:
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

    def has_row(self, user_id: str) -> bool:
        """Whether the store holds a recent-items row for the user, fresh or stale (emptiness probes)."""
        return self.user(user_id).event_ts is not None

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
            OnlineStoreUnavailable: the store failed, was late (``write_timeout_s``) or is skipped.
        """
        if event_ts.tzinfo is None:
            raise ValueError(f"event_ts={event_ts!r} must be timezone-aware (UTC)")
        return self.guard.call(self._push, user_id, items, event_ts, timeout_s=self.write_timeout_s)

    def _push(self, user_id: str, items: list[str], event_ts: datetime) -> bool:
        current = self.store.get_online_features(
            features=[f"{RECENT_ITEMS_VIEW}:{RECENT_ITEMS_FEATURE}"], entity_rows=[{"user_id": str(user_id)}]
        ).to_dict(include_event_timestamps=True)
        if current[RECENT_ITEMS_FEATURE + "__ts"][0] > int(event_ts.timestamp()):
            logger.info("push skipped: older than stored row user=%s", log_id(user_id))
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

    def push_many(
        self,
        rows: Mapping[str, list[str]],
        event_ts: datetime | Mapping[str, datetime],
        *,
        chunk_rows: int = PUSH_CHUNK_ROWS,
    ) -> int:
        """Write many users' recent-items lists, ``chunk_rows`` per Feast push (the re-sync).

        Unlike ``push_recent_items`` there is no read of the stored rows first: the lists must be
        derived from the log, as the re-sync does. Redis keeps a stored row that is newer than the
        pushed one; SQLite overwrites it. Each chunk has ``write_timeout_s`` per 100 rows (at least
        one ``write_timeout_s``).

        Args:
            rows: user_id -> item ids, oldest first.
            event_ts: tz-aware time of the newest event each list reflects: one for all rows, or
                one per user (the freshness limit of reads applies to it).
        Returns:
            The number of rows pushed.
        Raises:
            ValueError: an ``event_ts`` is naive.
            OnlineStoreUnavailable: a chunk failed or was late (earlier chunks stay written).
        """
        users = list(rows)
        stamps = {u: event_ts[u] for u in users} if isinstance(event_ts, Mapping) else dict.fromkeys(users, event_ts)
        naive = [u for u, ts in stamps.items() if ts.tzinfo is None]
        if naive:
            raise ValueError(f"event_ts of user {naive[0]!r} must be timezone-aware (UTC)")
        per_chunk = (self.write_timeout_s or 1.0) * max(1.0, chunk_rows / 100)
        for start in range(0, len(users), chunk_rows):
            part = users[start : start + chunk_rows]
            df = pd.DataFrame(
                {
                    "user_id": [str(u) for u in part],
                    RECENT_ITEMS_FEATURE: [[str(i) for i in rows[u]] for u in part],
                    "event_ts": [pd.Timestamp(stamps[u]).tz_convert("UTC") for u in part],
                    "created_ts": [pd.Timestamp(self.clock()).tz_convert("UTC")] * len(part),
                }
            )
            self.guard.call(self.store.push, RECENT_ITEMS_PUSH, df, to=PushMode.ONLINE, timeout_s=per_chunk)
        return len(users)

    def item_features(self, item_ids: list[str]) -> pd.DataFrame:
        """Item features of the service (stats and content) for ``item_ids``, one row each, in order.

        Not on serving's request path: it has the push deadline (``write_timeout_s``).
        """
        return self.guard.call(self._item_response, item_ids, timeout_s=self.write_timeout_s).to_df()

    def _item_response(self, item_ids: list[str]) -> Any:
        return self.store.get_online_features(
            features=self.item_refs,
            entity_rows=[{"item_id": str(i)} for i in item_ids],
            full_feature_names=True,
        )


def time_reads(features: OnlineFeatures, user_ids: list[str]) -> list[float]:
    """Wall time in milliseconds of one ``recent_items`` call per user id (for benchmarks)."""
    out = []
    for uid in user_ids:
        t0 = time.perf_counter()
        features.recent_items(uid)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out
