"""One typed settings object for every environment-dependent value.

Every field can be set by an environment variable ``RECLOOP_<FIELD>`` (e.g. ``RECLOOP_HOME``,
``RECLOOP_ONLINE_STORE=redis``) or a ``.env`` file. Only this module reads the ``RECLOOP_*``
variables (the process supervisor and the promotion check copy the environment to the children
they start); code below the edges (``models/``) receives plain values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recloop.gate import DEFAULT_MAX_COVERAGE_DROP, DEFAULT_MIN_GAIN
from recloop.policy import EventPolicy

# Telemetry and network opt-outs (docs/stack-notes.md): the platform must never phone home.
TELEMETRY_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "true",  # MLflow accepts only the exact string "true"
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",  # the sentence encoder ships inside a package; never download weights
    "TRANSFORMERS_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "FEAST_USAGE": "False",
    # Quiet consoles: no download/progress bars from the text encoder's libraries.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
}


class Settings(BaseSettings):
    """recloop configuration. Paths are resolved against the current directory at load time."""

    model_config = SettingsConfigDict(env_prefix="RECLOOP_", env_file=".env", frozen=True, extra="ignore")

    home: Path = Field(default=Path(".recloop"), description="Working directory for all local state")
    profile: Literal["local", "prod"] = Field(default="local", description="local = embedded defaults")
    seed: int = Field(default=42, description="Global seed recorded with every run")

    # Orchestration and registry
    prefect_port: int = Field(default=4200, description="Port of the local Prefect server (`recloop up`)")
    prefect_api_url: str = Field(default="", description="Prefect server API; default the local server's port")
    mlflow_tracking_uri: str | None = Field(default=None, description="Default: sqlite under home")
    mlflow_artifact_root: str | None = Field(default=None, description="Default: home/mlartifacts")
    mlflow_port: int = 5000
    model_name: str = Field(default="recloop-sasrec", description="MLflow registered model name")
    model_alias: str = Field(default="champion", description="The alias serving follows and promotion moves")
    model_class: str = Field(default="sasrec", description="The sequential model trained (models/factory.py)")
    item_repr: Literal["id", "id+text", "text"] = Field(
        default="id", description="Item vectors of a model trained from scratch: ID embeddings, ID + projected item"
        " text, or text only (models.contract.ITEM_REPRS; a warm start keeps the served model's)",
    )
    # The text path's fixes for a text-aware model trained from scratch (chosen on the cold-item protocol's
    # validation window, bench/text_quality.py; issue 18's closing note has the figures).
    text_norm: bool = Field(default=True, description="Text-aware: LayerNorm with a learned gain on the projected text")
    id_dropout: float = Field(default=0.5, ge=0.0, lt=1.0, description="'id+text': share of items whose ID part is "
                              "dropped per training step (DropoutNet), so the text part alone scores new items")
    cold_id: bool = Field(default=True, description="'id+text' with id_dropout > 0: one learned ID vector stands in "
                          "for dropped and new items' missing ID embedding (else a zero ID part)")
    id_expectation: bool = Field(default=True, description="'id+text' with id_dropout > 0: outside training an item's "
                                 "ID part is its expected value under the ID dropout (dropout's weight-scaling rule)")

    # Event log and feature store
    event_log_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite under home")
    postgres_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    online_store: Literal["sqlite", "redis"] = Field(default="sqlite", description="Feast online store")
    redis_url: str = Field(default="127.0.0.1:6379", description="Feast Redis connection string")
    feature_repo_path: Path = Path("feature_repo")
    feast_project: str = Field(default="recloop", description="Feast project (also the Redis key suffix)")
    feature_service: str = Field(default="sasrec_v1", description="The model's feature contract")
    online_freshness_s: float = Field(
        default=float("inf"), ge=0,
        description="Max age (s) of an online row before it reads as missing; inf = no limit (replayed "
        "historical datasets such as MovieLens are years old). Production: e.g. 2592000 (30 days)",
    )
    online_timeout_ms: float = Field(
        default=100.0, gt=0,
        description="Deadline of one online-store read (Redis sockets time out at twice it); a late or "
        "failed read makes serving fall back to the history rebuilt from the lake and the event log",
    )
    online_write_timeout_ms: float = Field(
        default=500.0, gt=0, description="Deadline of one online-store push (a Feast push takes ~15 ms)"
    )
    online_breaker_s: float = Field(
        default=5.0, ge=0, description="After an online-store failure, skip the store for this long (circuit breaker)"
    )
    online_check_interval_s: float = Field(
        default=10.0, gt=0,
        description="How often serving checks that the online store is not empty (re-synced when it is)",
    )

    # Data and validation
    max_seq_len: int = Field(default=50, ge=2, le=4096, description="Items of history the model sees")
    rating_min: float = 0.5
    rating_max: float = 5.0
    max_bad_row_share: float = Field(default=0.01, ge=0, le=1, description="Quarantine tolerance")
    future_skew_s: float = Field(default=300.0, ge=0, description="Allowed clock skew for timestamps")
    timestamp_floor: str = Field(default="1990-01-01T00:00:00Z", description="Events before it are bad")
    bot_max_user_share: float = Field(default=0.05, gt=0, le=1, description="Max share of one user")
    bot_guard_min_events: int = Field(default=1000, ge=0, description="Batches smaller than this skip the bot guard")
    unknown_item_max_share: float = Field(default=0.05, ge=0, le=1, description="Events naming new items")

    # Event policy (recloop/policy.py): what each event type means for a history
    event_positive: str = Field(
        default="view,click,like,purchase,rating",
        description="Event types that are consumption: history, training target, click (comma separated)",
    )
    event_negative: str = Field(
        default="skip", description="Event types that are 'not interested': suppressed, never a target"
    )
    rating_negative_below: float | None = Field(
        default=None, description="A rating below this is a negative (None: every rating is consumption)"
    )
    negative_suppress_s: float = Field(
        default=30 * 86_400.0, ge=0, description="Seconds a negative hides its item from that user"
    )

    # Exposure log (recloop/exposures.py): what the service showed
    exposure_log: bool = Field(default=True, description="Record every recommend answer in the exposure log")
    exposure_flush_ms: float = Field(
        default=100.0, gt=0, description="Exposure batches are written this often (a kill -9 loses at most these)"
    )
    exposure_queue_max: int = Field(default=10_000, ge=1, description="Exposures waiting to be written, at most")
    exposure_retention_days: float = Field(
        default=90.0, gt=0, description="Exposures older than this are pruned by the online-metrics flow"
    )

    # Exploration (models/exploration.py) and off-policy estimates in the gate (flows/ope.py)
    exploration: str = Field(
        default="greedy",
        description="The service's exploration policy: greedy | epsilon:0.05 | plackett_luce:tau=0.5,n=50 "
        "(an online experiment may set one per arm); every slot's propensity is logged with the exposure",
    )
    # Re-ranking, business rules, freshness (models/rerank.py, recloop/blocklist.py)
    rerank_default: Literal["mmr", "dpp"] = Field(
        default="mmr", description="Re-ranker a recommend request with diversity > 0 uses unless it names one"
    )
    rerank_candidates: int = Field(
        default=100, ge=1, le=10_000, description="Top-N candidates (after masking) the re-ranker reorders"
    )
    rerank_eval_users: int = Field(
        default=500, ge=0, description="Validation (and test) users of the re-ranking trade-off each evaluation "
        "reports (models/tradeoff.py; a seeded sample; 0 = skip it)",
    )
    blocklist_ttl_s: float = Field(
        default=5.0, ge=0, description="Seconds a serving worker reuses the blocklist it read (every worker sees a"
        " change within this)",
    )
    catalog_ttl_s: float = Field(
        default=5.0, ge=0, description="Seconds a serving worker reuses the new-item catalogue it read (every worker"
        " serves a new item within this)",
    )
    query_weight: float = Field(
        default=0.5, ge=0, le=1, description="Weight of a recommend query's text similarity against the sequence"
        " score (both standardised; models.text_items.blend_query)",
    )
    query_max_chars: int = Field(default=200, ge=1, le=2000, description="Longest recommend query accepted")
    query_cache_size: int = Field(default=1024, ge=0, description="Query embeddings kept per worker (LRU)")
    freshness_days: float = Field(
        default=30.0, ge=0, description="An item is fresh when added to the catalogue in the last N days, counted"
        " back from the data's newest timestamp",
    )
    freshness_boost: float = Field(
        default=0.0, ge=0, le=1, description="Re-ranking boost of a fresh item, in units of the candidates' score"
        " range (0 = off)",
    )
    ope_gate: bool = Field(default=True, description="Add the off-policy CTR estimate rule to the gate")
    ope_estimator: Literal["snips", "dr", "iips", "pi"] = Field(default="snips", description="Estimator the rule uses")
    ope_tolerance: float = Field(
        default=0.01, ge=0,
        description="The candidate's lower 95% bound may fall this far (absolute CTR) below the champion's estimate",
    )
    ope_min_requests: int = Field(default=500, ge=1, description="Fewer logged exploratory requests: rule skipped")
    ope_min_ess: float = Field(default=100.0, ge=0, description="Smaller effective sample size: rule skipped")
    ope_max_unsupported_share: float = Field(
        default=0.2, ge=0, le=1, description="More target mass outside the logged support: rule skipped"
    )

    # Evaluation gate
    gate_min_gain: float = Field(default=DEFAULT_MIN_GAIN, description="Candidate NDCG@10 >= champion * (1 + min_gain)")
    gate_max_coverage_drop: float = Field(default=DEFAULT_MAX_COVERAGE_DROP, ge=0, le=1,
                                          description="Allowed coverage@10 drop")
    auto_promote: bool = Field(default=True, description="Move model_alias automatically when the gate passes")

    # Serving
    serve_host: str = "127.0.0.1"
    serve_port: int = 3000
    serve_workers: int | None = Field(
        default=None, ge=1, le=64,
        description="BentoML worker processes of one service; unset = the usable cores on the production stores"
        " (a PostgreSQL event log and the Redis online store), 1 on the embedded SQLite default (its writers"
        " share one database write lock, so more workers add memory, not feedback throughput)."
        " Read-your-writes holds across workers and replicas: each online push runs under the event log's"
        " per-user write lock (``effective_serve_workers``)",
    )
    serve_poll_interval_s: float = Field(default=5.0, gt=0, description="Champion alias poll interval")
    api_key: str | None = Field(default=None, description="If set, required in the X-API-Key header")
    serve_allowed_hosts: str = Field(
        default="127.0.0.1,localhost,[::1]",
        description="Host headers the service answers (comma separated; serve_host is added; '*' = any)",
    )
    serve_body_timeout_s: float = Field(default=2.0, gt=0, description="Max seconds to receive a request body")
    max_k: int = Field(default=200, ge=1, description="Upper bound of k in recommend")
    serve_model_version: str | None = Field(
        default=None, description="Serve this registry version and do not follow the alias (a pinned Bento)"
    )

    # Continuous loop
    loop_cron: str = Field(default="0 * * * *", description="Schedule of the continuous loop")

    # Forgetting a user (recloop/forget.py)
    forget_salt: str | None = Field(
        default=None, description="Secret key of the salted user hash (HMAC-SHA256) of deletion receipts and "
        "tombstones; the same on every replica. Unset: a random key generated once under home/state/forget_salt",
    )
    pseudonymize_user_ids: bool = Field(
        default=False, description="Replace every user id by a keyed hash (HMAC-SHA256 with pseudonym_key) where it "
        "enters: at ingestion and at the API, so no store holds a raw id (recloop/pseudonym.py)",
    )
    pseudonym_key: SecretStr | None = Field(
        default=None, description="The pseudonyms' secret (>= 16 characters), the same on every replica and flow "
        "run; required when pseudonymize_user_ids is on. Changing it orphans stored pseudonyms",
    )
    forget_lock_timeout_s: float = Field(
        default=3.0, ge=0, description="How long POST /forget waits for the loop's lock before answering "
        "'pending' (the tombstone holds at once; the worker finishes the deletion when the lock is free)",
    )
    forget_settle_s: float = Field(
        default=1.0, ge=0, description="Pause before a forget's second deletion pass (writes already past "
        "the tombstone check, e.g. queued exposures, land by then)",
    )
    loop_gap_grace_s: float = Field(
        default=600.0, ge=0, description="A seq missing below the loop's watermark is re-read this long (a "
        "PostgreSQL insert may commit after a larger seq; recloop/cursor.py)",
    )
    loop_trigger_cooldown_s: float = Field(
        default=3600.0, ge=0, description="After a monitor event started the loop, the same kind of event "
        "starts none for this long (the automation's window)",
    )
    loop_incremental: bool = Field(
        default=True, description="A warm loop turn updates features from the new lake batches only and retrains "
        "and evaluates on samples (flows/loop_incremental.py); False = every turn rebuilds from the whole lake",
    )
    loop_replay_users: int = Field(
        default=2000, ge=0, description="Users an incremental turn retrains on besides the ones its new events "
        "touched: a seeded uniform replay sample of the lake's other users (recloop/loop_sample.py)",
    )
    loop_eval_users: int = Field(
        default=2000, ge=1, description="Users an incremental turn evaluates candidate, champion and baselines "
        "on: a seeded fixed-size sample of its training set's evaluable users",
    )

    # Monitors (recloop/drift.py, recloop/monitors.py, flows/watch.py); docs/operations.md "Monitors"
    monitor_cron: str = Field(default="*/10 * * * *", description="Schedule of the monitor flow")
    monitor_reference_events: int = Field(
        default=200_000, ge=100, description="Newest lake events the drift statistics compare with"
    )
    monitor_window_max_events: int = Field(
        default=50_000, ge=1, description="Newest unconsumed log events a drift check reads, at most"
    )
    monitor_min_events: int = Field(default=200, ge=1, description="Fewer new events: drift is not assessed")
    monitor_bootstrap_windows: int = Field(default=200, ge=10, description="Windows of the no-drift distribution")
    monitor_drift_quantile: float = Field(
        default=0.99, gt=0, le=1, description="A drift threshold is this quantile of the statistic over no-drift "
        "windows of the reference"
    )
    monitor_popularity_js_max: float | None = Field(default=None, description="Fixed threshold (None: derived)")
    monitor_activity_js_max: float | None = Field(default=None, description="Fixed threshold (None: derived)")
    monitor_new_item_share_max: float | None = Field(default=None, description="Fixed threshold (None: derived)")
    monitor_event_mix_js_max: float | None = Field(default=None, description="Fixed threshold (None: derived)")
    monitor_ctr_baseline_exposures: int = Field(
        default=1000, ge=1, description="The served version's first exposures that make its CTR baseline"
    )
    monitor_freshness_max_lag_s: float = Field(
        default=60.0, ge=0, description="An online write older than this that has not landed makes the store stale"
    )
    monitor_freshness_sample: int = Field(default=1000, ge=1, description="Newest log events the freshness check reads")
    monitor_max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Serving 5xx share above it: unhealthy")
    monitor_max_p99_ms: float = Field(default=500.0, gt=0, description="Serving p99 above it: unhealthy")

    @field_validator("timestamp_floor")
    @classmethod
    def _aware_floor(cls, value: str) -> str:
        """Any ISO date or datetime; a naive one is UTC. Stored as an aware ISO string."""
        import pandas as pd

        try:
            ts = pd.Timestamp(value)
        except ValueError as err:
            raise ValueError(f"timestamp_floor={value!r} is not an ISO date/datetime") from err
        return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).isoformat()

    @model_validator(mode="after")
    def _resolve_home(self) -> Settings:
        object.__setattr__(self, "home", self.home.expanduser().resolve())
        if not self.prefect_api_url:
            object.__setattr__(self, "prefect_api_url", f"http://127.0.0.1:{self.prefect_port}/api")
        return self

    @model_validator(mode="after")
    def _valid_policy(self) -> Settings:
        EventPolicy.from_settings(self)  # raises ValueError naming the bad event type
        _check_exploration(self.exploration)
        return self

    @property
    def event_policy(self) -> EventPolicy:
        """The event policy these settings define (``recloop.policy``)."""
        return EventPolicy.from_settings(self)

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking URI (sqlite file under home unless configured)."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> str:
        """The MLflow artifact root (always explicit, see docs/stack-notes.md)."""
        return self.mlflow_artifact_root or (self.home / "mlartifacts").as_uri()

    @property
    def event_log_uri(self) -> str:
        """SQLAlchemy URL of the event log: SQLite under home locally, PostgreSQL in prod."""
        if self.event_log_url:
            return self.event_log_url
        if self.profile == "prod":
            return self.postgres_url
        return f"sqlite:///{self.home / 'eventlog.db'}"

    @property
    def effective_serve_workers(self) -> int:
        """The service's worker processes: ``serve_workers`` when set; otherwise the cores this process may
        run on (``os.sched_getaffinity``) when the event log is PostgreSQL and the online store Redis, else 1.

        Why one on the embedded default: SQLite serialises every feedback write on one database write lock
        and the SQLite online store is a file as well, so extra workers only hold more model copies; the
        production stores let workers write in parallel (per-user advisory locks).
        """
        if self.serve_workers is not None:
            return self.serve_workers
        shared = self.online_store == "redis" and self.event_log_uri.startswith("postgresql")
        if not shared:
            return 1
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, min(64, cores))

    @property
    def lake_path(self) -> Path:
        """Root of the Parquet lake (events/, items/, users/)."""
        return self.home / "lake"


def _check_exploration(text: str) -> None:
    """The exploration text's grammar (``models.exploration.ExplorationPolicy.parse`` is the parser;
    the kernel does not import models/): a name and optional parameters."""
    name = text.split(":", 1)[0].strip()
    if name not in ("greedy", "epsilon", "plackett_luce"):
        raise ValueError(f"exploration={text!r}: expected greedy | epsilon:EPS | plackett_luce:tau=T,n=N")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; call ``get_settings.cache_clear()`` after changing env)."""
    return Settings()


def online_history_len(max_seq_len: int, model_max_seq_lens: Iterable[int | None] = ()) -> int:
    """Items of each user's recent history the online path keeps: serving's lake windows and event-log tail,
    the lists it pushes to the online store, and the materialised ``user_recent_items``.

    The larger of ``settings.max_seq_len`` and every model's own ``config.max_seq_len`` that may read the
    history (the served champion, an online experiment's arms; for materialisation also the newest tuned run,
    the next cold train's length). A tuned model with ``max_seq_len`` 200 thus receives up to 200 items; a
    model with a shorter window still works, since scoring keeps the last ``max_seq_len`` of its input
    (``models.ranking.score_histories``, ``score``'s ``item_idx[:, -max_seq_len:]``).

    Args:
        max_seq_len: ``Settings.max_seq_len`` (``RECLOOP_MAX_SEQ_LEN``), items, >= 1.
        model_max_seq_lens: the models' ``max_seq_len`` in items; None entries (unknown) are skipped.
    Returns:
        The history length in items, >= ``max_seq_len``.
    Raises:
        ValueError: a length below 1.
    """
    lengths = [int(max_seq_len), *(int(n) for n in model_max_seq_lens if n is not None)]
    bad = [n for n in lengths if n < 1]
    if bad:
        raise ValueError(f"max_seq_len values {bad} must be >= 1 (items of history)")
    return max(lengths)


def configure_environment() -> None:
    """Apply the telemetry/network opt-outs to this process's environment (keeps explicit values).

    Call once at each entry point (CLI, service, tests) before importing MLflow, Prefect or BentoML.
    """
    for key, value in TELEMETRY_ENV.items():
        os.environ.setdefault(key, value)
