"""The validation gate: contract split + GX suites + quarantine policy, and its Prefect flow.

Policy (issue #4): structural failures stop the batch before features and training (missing or
renamed columns, wrong types, an empty batch, the bot guard, too many unknown items, too many bad
rows). Row-level failures (contract violations, out-of-range ratings, timestamps in the future or
before the floor, conflicting duplicate ``event_id``) send the rows to quarantine and let the rest
through while ``bad_share = rows_quarantined / rows_in <= max_bad_row_share``. Exact repeats of an
event (same ``event_id`` and content) are deduplicated and recorded, not counted as bad.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from recloop.contract import coerce_items, coerce_users
from recloop.forget import drop_forgotten, tombstone_filter
from recloop.quarantine import REJECT_COLUMNS, DataValidationError, as_text_columns, split_events
from recloop.settings import Settings, get_settings

logger = logging.getLogger(__name__)


class GateConfig(BaseModel):
    """Thresholds of the gate (see ``recloop.settings.Settings`` for their meaning)."""

    model_config = ConfigDict(frozen=True)
    rating_min: float = 0.5
    rating_max: float = 5.0
    max_bad_row_share: float = Field(default=0.01, ge=0, le=1)
    future_skew_s: float = Field(default=300.0, ge=0)
    timestamp_floor: datetime = datetime(1990, 1, 1, tzinfo=UTC)
    bot_max_user_share: float = Field(default=0.05, gt=0, le=1)
    bot_guard_min_events: int = Field(default=1000, ge=0, description="Smaller batches skip the bot guard")
    unknown_item_max_share: float = Field(default=0.05, ge=0, le=1)

    @classmethod
    def from_settings(cls, settings: Settings, rating_range: tuple[float, float] | None = None) -> GateConfig:
        """Gate thresholds from settings; ``rating_range`` (the source's scale) overrides the settings'."""
        lo, hi = rating_range or (settings.rating_min, settings.rating_max)
        return cls(
            rating_min=lo,
            rating_max=hi,
            max_bad_row_share=settings.max_bad_row_share,
            future_skew_s=settings.future_skew_s,
            timestamp_floor=pd.Timestamp(settings.timestamp_floor).to_pydatetime(),
            bot_max_user_share=settings.bot_max_user_share,
            bot_guard_min_events=settings.bot_guard_min_events,
            unknown_item_max_share=settings.unknown_item_max_share,
        )


class ValidationOutcome(BaseModel):
    """What the gate decided about one batch. Frames ride along but are excluded from dumps."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    batch_id: str
    source: str
    as_of: datetime
    passed: bool
    stopped: bool
    failing: list[str] = Field(description="Failing stop-level checks/expectations, with observed values")
    rows_in: int
    rows_ok: int
    rows_quarantined: int
    rows_deduplicated: int
    rows_forgotten: int = Field(default=0, description="Forgotten users' rows dropped before the gate (recloop.forget)")
    bad_share: float = Field(description="rows_quarantined / rows_in (0 for an empty batch)")
    max_bad_row_share: float
    unexpected_counts: dict[str, int] = Field(description="Check/expectation key -> failing rows")
    expectations: list[dict[str, Any]] = Field(default_factory=list, description="Every expectation's result")
    duration_s: float
    results_path: str | None = None
    quarantine_dir: str | None = None
    data_docs_path: str | None = None
    events: pd.DataFrame | None = Field(default=None, exclude=True, repr=False)
    items: pd.DataFrame | None = Field(default=None, exclude=True, repr=False)
    users: pd.DataFrame | None = Field(default=None, exclude=True, repr=False)
    quarantined: pd.DataFrame | None = Field(default=None, exclude=True, repr=False)
    runner: Any = Field(default=None, exclude=True, repr=False)


def _dimension_view(raw: pd.DataFrame, key: str) -> pd.DataFrame:
    """The raw dimension table with ``key`` as str-or-None (whole floats read as ints), RangeIndex."""
    view = raw.reset_index(drop=True).copy()
    if key in view.columns:
        col = view[key]
        if pd.api.types.is_float_dtype(col):
            col = col.map(lambda v: v if pd.isna(v) else (int(v) if float(v).is_integer() else v))
        view[key] = [None if pd.isna(v) else str(v).strip() for v in col]
    return view.drop(columns=[c for c in view.columns if view[c].map(type).eq(list).any()])


def _events_view(good: pd.DataFrame) -> pd.DataFrame:
    """Coerced events plus ``user_share`` (share of the batch's events made by the row's user)."""
    counts = good["user_id"].map(good["user_id"].value_counts())
    return good.assign(user_share=(counts / max(len(good), 1)).astype("float64"))


def _describe(kind: str, column: str | None, shown: object, params: dict[str, Any]) -> str:
    """A one-line reason for a quarantined row: the value and the rule it broke."""
    if kind == "expect_column_values_to_be_between":
        lo, hi = ("rating_min", "rating_max") if column == "value" else ("ts_min", "ts_max")
        return f"{column}={shown} outside [{params[lo]}, {params[hi]}]"
    if kind == "expect_column_values_to_not_be_null":
        return f"{column} is null"
    return f"{column}={shown} failed {kind}"


def _outcome_dicts(outcomes: list[Any]) -> list[dict[str, Any]]:
    keep = ("key", "on_fail", "success", "unexpected_count", "observed_value", "error")
    return [{k: getattr(o, k) for k in keep} for o in outcomes]


def validate_batch(
    events: pd.DataFrame,
    items: pd.DataFrame | None = None,
    users: pd.DataFrame | None = None,
    *,
    source: str,
    as_of: datetime,
    config: GateConfig | None = None,
    batch_id: str | None = None,
) -> ValidationOutcome:
    """Validate one batch of raw frames (contract column names, raw values). No files, no Prefect.

    Args:
        events: raw events (``recloop.quarantine.split_events`` input), one row per event.
        items: raw catalogue or None (then the known-item check uses the batch's own items: vacuous).
        users: raw users or None.
        source: source name recorded on events without one.
        as_of: tz-aware run time; timestamps after ``as_of + future_skew_s`` are quarantined.
        config: gate thresholds (default ``GateConfig()``).
        batch_id: id of the batch (default ``<source>-<as_of>``).
    Returns:
        The outcome; on a pass, ``outcome.events`` holds the coerced, accepted events and
        ``outcome.quarantined`` the rejected rows (original values, ``row``, ``check``, ``reason``,
        ``action``). A stopped batch returns ``stopped=True`` (it does not raise).
    Raises:
        ValueError: ``as_of`` is naive.
    """
    from expectations.runner import SuiteRunner  # heavy import (GX), kept off module import

    start = time.perf_counter()
    if as_of.tzinfo is None:
        raise ValueError(f"as_of={as_of!r} must be timezone-aware (UTC)")
    cfg = config or GateConfig()
    batch_id = batch_id or f"{source}-{as_of.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    common = {
        "batch_id": batch_id,
        "source": source,
        "as_of": as_of,
        "max_bad_row_share": cfg.max_bad_row_share,
    }
    rows_in = len(events)
    try:
        split = split_events(events, source)
    except DataValidationError as err:
        return ValidationOutcome(
            **common, passed=False, stopped=True, failing=err.failing, rows_in=rows_in, rows_ok=0,
            rows_quarantined=0, rows_deduplicated=0, bad_share=0.0, unexpected_counts={},
            duration_s=time.perf_counter() - start,
        )  # fmt: skip
    good, rejected = split.good, split.rejected
    runner = SuiteRunner()
    dims = {"items": (items, "item_id", coerce_items), "users": (users, "user_id", coerce_users)}
    coerced: dict[str, pd.DataFrame | None] = {"items": None, "users": None}
    outcomes, failing = [], []
    for table, (raw, key, coerce) in dims.items():
        if raw is None or raw.empty:
            continue
        results = runner.run(table, _dimension_view(raw, key))
        outcomes += results
        if all(o.success for o in results):
            coerced[table] = coerce(raw)
    known = coerced["items"]["item_id"] if coerced["items"] is not None else good["item_id"]
    params = {
        "rating_min": cfg.rating_min,
        "rating_max": cfg.rating_max,
        "ts_min": pd.Timestamp(cfg.timestamp_floor).tz_convert("UTC"),
        "ts_max": pd.Timestamp(as_of).tz_convert("UTC") + timedelta(seconds=cfg.future_skew_s),
        "known_item_ids": sorted(set(known)),
        "known_item_mostly": 1.0 - cfg.unknown_item_max_share,
        # A handful of feedback events from one user is not a bot: guard only batches of a useful size.
        "bot_max_user_share": cfg.bot_max_user_share if len(good) >= cfg.bot_guard_min_events else 1.0,
    }
    outcomes += runner.run("events", _events_view(good), params)

    reasons: dict[int, list[tuple[str, str]]] = {}
    for o in outcomes:
        if o.on_fail == "quarantine" and o.table == "events" and o.unexpected_rows:
            for pos in o.unexpected_rows:
                shown = good.at[pos, o.column] if o.column else None
                reasons.setdefault(pos, []).append((o.key, _describe(o.type, o.column, shown, params)))
        elif not o.success or o.error:
            failing.append(
                f"{o.key} observed={o.observed_value!r}" + (f" error={o.error}" if o.error else "")
            )
    positions = np.array(sorted(reasons), dtype=np.int64)
    if len(positions):
        gx_rejected = events.reset_index(drop=True).iloc[split.good_rows[positions]].copy()
        gx_rejected["row"] = split.good_rows[positions]
        gx_rejected["check"] = [reasons[p][0][0] for p in positions]
        gx_rejected["reason"] = ["; ".join(r for _, r in reasons[p]) for p in positions]
        gx_rejected["action"] = "quarantined"
        rejected = pd.concat([rejected, gx_rejected.reset_index(drop=True)], ignore_index=True)
    accepted = good.drop(index=positions).reset_index(drop=True)
    n_dedup = int((rejected["action"] == "deduplicated").sum())
    n_bad = len(rejected) - n_dedup
    bad_share = n_bad / rows_in if rows_in else 0.0
    if bad_share > cfg.max_bad_row_share:
        failing.append(f"bad_row_share={bad_share:.4f} > max_bad_row_share={cfg.max_bad_row_share}")
    counts = {k: int(v) for k, v in rejected["check"].value_counts().items()}
    counts.update({o.key: o.unexpected_count for o in outcomes if o.unexpected_count})
    stopped = bool(failing)
    return ValidationOutcome(
        **common, passed=not stopped, stopped=stopped, failing=failing, rows_in=rows_in,
        rows_ok=len(accepted), rows_quarantined=n_bad, rows_deduplicated=n_dedup, bad_share=bad_share,
        unexpected_counts=counts, expectations=_outcome_dicts(outcomes),
        duration_s=time.perf_counter() - start, events=accepted, items=coerced["items"],
        users=coerced["users"], quarantined=rejected[[*events.columns, *REJECT_COLUMNS]], runner=runner,
    )  # fmt: skip


def safe_batch_id(batch_id: str) -> str:
    """``batch_id`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (a folder name)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", batch_id)


def write_outcome(outcome: ValidationOutcome, home: Path, data_docs: bool = True) -> ValidationOutcome:
    """Write ``home/quarantine/<batch>/{result.json, quarantined.parquet}`` and Data Docs under
    ``home/data_docs/``; returns the outcome with the paths filled in."""
    out_dir = home / "quarantine" / safe_batch_id(outcome.batch_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    update: dict[str, Any] = {"quarantine_dir": str(out_dir), "results_path": str(out_dir / "result.json")}
    if outcome.quarantined is not None:
        as_text_columns(outcome.quarantined).to_parquet(out_dir / "quarantined.parquet", index=False)
    if data_docs and outcome.runner is not None:
        update["data_docs_path"] = str(outcome.runner.build_data_docs(home / "data_docs"))
    outcome = outcome.model_copy(update=update)
    gx_results = outcome.runner.results if outcome.runner is not None else {}
    payload = {"outcome": outcome.model_dump(mode="json"), "gx_results": gx_results}
    (out_dir / "result.json").write_text(json.dumps(payload, indent=1, default=str))
    return outcome


def read_and_validate(
    source: str, path: str | None, as_of: datetime, batch_id: str | None = None, **options: Any
) -> ValidationOutcome:
    """Read ``source`` with ``recloop.sources.read_source`` and run the gate with the settings' thresholds.

    ``options`` go to the source reader (e.g. ``seed`` of the synthetic source).

    Raises:
        DataValidationError: the source cannot be read as its format promises (e.g. a renamed or
            missing column): a structural stop before any row is looked at.
    """
    from recloop.sources import SourceError, read_source

    try:
        frames = read_source(source, Path(path) if path else None, **options)
    except SourceError as err:
        raise DataValidationError([f"source.read: {err}"]) from err
    cfg = GateConfig.from_settings(get_settings(), frames.meta.get("rating_range"))
    # Forgotten users' rows never reach the gate, the quarantine or the lake (re-ingesting the source keeps them out).
    forgotten = tombstone_filter(get_settings())
    events, n_forgotten = drop_forgotten(frames.events, forgotten)
    users, _ = drop_forgotten(frames.users, forgotten)
    outcome = validate_batch(events, frames.items, users, source=source, as_of=as_of, config=cfg, batch_id=batch_id)
    return outcome.model_copy(update={"rows_forgotten": n_forgotten}) if n_forgotten else outcome


validate_task = task(read_and_validate, name="validate-batch", cache_policy=NO_CACHE)


@task(name="write-validation", cache_policy=NO_CACHE)
def write_task(outcome: ValidationOutcome, home: Path) -> ValidationOutcome:
    """Save the result JSON, the quarantined rows and the Data Docs."""
    return write_outcome(outcome, home)


@flow(name="validate")
def validate_flow(
    source: str, path: str | None = None, batch_id: str | None = None, as_of: datetime | None = None
) -> ValidationOutcome:
    """Validate one source batch; raise ``DataValidationError`` (listing failing checks) on a stop."""
    log = get_run_logger()
    outcome = validate_task(source, path, as_of or datetime.now(UTC), batch_id)
    outcome = write_task(outcome, get_settings().home)
    log.info(
        "validation batch=%s passed=%s rows_in=%d rows_ok=%d quarantined=%d deduplicated=%d bad_share=%.4f "
        "duration_s=%.2f forgotten=%d",
        outcome.batch_id, outcome.passed, outcome.rows_in, outcome.rows_ok, outcome.rows_quarantined,
        outcome.rows_deduplicated, outcome.bad_share, outcome.duration_s, outcome.rows_forgotten,
    )  # fmt: skip
    log.info("data docs: %s ; results: %s", outcome.data_docs_path, outcome.results_path)
    if outcome.stopped:
        raise DataValidationError(outcome.failing, detail=f"see {outcome.results_path}")
    return outcome
