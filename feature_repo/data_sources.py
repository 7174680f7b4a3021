"""Feast data sources: Parquet files written by flows/features.py, plus the push source.

Paths are RELATIVE on purpose. Feast resolves a relative FileSource path against the store's
``repo_path``; recloop builds the store with ``repo_path = RECLOOP_HOME`` (flows/features.py,
``featurestore/online.py``), so the files live in ``$RECLOOP_HOME/features/`` and never in this repo.
With the ``feast`` CLI, run it from the home: ``feast -c "$RECLOOP_HOME" -f <repo>/feature_store.yaml``.

Each path is a folder of Parquet parts: the full build's ``part-base.parquet`` plus one part per incremental
loop turn (``featurestore/incremental.py``); Feast's file source reads the whole folder.

Every source has ``event_ts`` (when the value became true) and ``created_ts`` (when the row was
computed; Feast's tie-break between rows with equal ``event_ts``), both UTC.
"""

from feast import FileSource, PushSource

# One row per (user, event timestamp): the user's last N item ids after that timestamp.
user_recent_items_source = FileSource(
    name="user_recent_items_source",
    path="features/user_recent_items",
    timestamp_field="event_ts",
    created_timestamp_column="created_ts",
    description="User's last N item ids per event timestamp (batch, from the lake)",
    tags={"owner": "recloop"},
)

# Real-time refresh of the same view: the feedback API pushes the user's new list.
user_recent_items_push = PushSource(
    name="user_recent_items_push",
    batch_source=user_recent_items_source,
    description="Fresh recent-items lists pushed by the feedback path",
    tags={"owner": "recloop"},
)

# Cumulative per-user statistics per event timestamp.
user_stats_source = FileSource(
    name="user_stats_source",
    path="features/user_stats",
    timestamp_field="event_ts",
    created_timestamp_column="created_ts",
    description="Per-user cumulative statistics per event timestamp",
    tags={"owner": "recloop"},
)

# Per-item popularity and rating statistics per event timestamp (+ snapshots at the data's as-of).
item_stats_source = FileSource(
    name="item_stats_source",
    path="features/item_stats",
    timestamp_field="event_ts",
    created_timestamp_column="created_ts",
    description="Per-item popularity (all-time, trailing 7/30 days) and ratings",
    tags={"owner": "recloop"},
)

# Item text embeddings from the packaged sentence encoder, and genres.
item_content_source = FileSource(
    name="item_content_source",
    path="features/item_content",
    timestamp_field="event_ts",
    created_timestamp_column="created_ts",
    description="Item text embedding (all-MiniLM-L6-v2) and genres",
    tags={"owner": "recloop"},
)
