"""Feast feature views: what training (offline, point in time) and serving (online) read.

Item ids are stored as their raw external STRINGS, not model indices: each model version has its
own ItemVocabulary (index 0 = padding), so an index list would be wrong for the next model and
every retrain would force a full re-materialisation. Strings survive vocabulary changes; serving
maps them to indices with the vocabulary of the model that answers (unknown ids are dropped).

TTL: Feast applies it to point-in-time joins only; online reads are checked by recloop
(``featurestore/online.py``, ``settings.online_freshness_s``).
"""

from datetime import timedelta

from data_sources import item_content_source, item_stats_source, user_recent_items_push, user_stats_source
from entities import item, user
from feast import FeatureView, Field
from feast.types import Array, Float32, Float64, Int64, String, UnixTimestamp

# The user's item sequence, refreshed in real time by the feedback path through the push source.
user_recent_items = FeatureView(
    name="user_recent_items",
    entities=[user],
    ttl=timedelta(days=365),
    online=True,
    schema=[
        Field(
            name="recent_item_ids",
            dtype=Array(String),
            description="Last N item ids (raw strings), oldest first; N = settings.max_seq_len",
        ),
    ],
    source=user_recent_items_push,
    tags={"owner": "recloop", "entity": "user", "refresh": "push+batch"},
)

# Cumulative user statistics (cold-start and re-ranking signals).
user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=timedelta(days=365),
    online=True,
    schema=[
        Field(name="n_events", dtype=Int64, description="Events of the user so far"),
        Field(name="n_distinct_items", dtype=Int64, description="Distinct items the user interacted with"),
        Field(name="last_event_ts", dtype=UnixTimestamp, description="Time of the user's latest event, UTC"),
        Field(name="mean_rating", dtype=Float64, description="Mean of the user's non-null event values"),
    ],
    source=user_stats_source,
    tags={"owner": "recloop", "entity": "user", "refresh": "batch"},
)

# Item popularity as of the row's timestamp (all-time and trailing windows) and ratings.
item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(days=365),
    online=True,
    schema=[
        Field(name="popularity", dtype=Int64, description="All-time event count of the item"),
        Field(name="popularity_7d", dtype=Int64, description="Events in the 7 days up to event_ts"),
        Field(name="popularity_30d", dtype=Int64, description="Events in the 30 days up to event_ts"),
        Field(name="mean_rating", dtype=Float64, description="Mean non-null event value of the item"),
        Field(name="last_event_ts", dtype=UnixTimestamp, description="Time of the item's latest event, UTC"),
    ],
    source=item_stats_source,
    tags={"owner": "recloop", "entity": "item", "refresh": "batch"},
)

# Static item content: text embedding (title + genres + text) and genres. ttl=0 means "never
# expires" in Feast: content is an attribute of the item, not an observation that ages.
item_content = FeatureView(
    name="item_content",
    entities=[item],
    ttl=timedelta(0),
    online=True,
    schema=[
        Field(
            name="embedding",
            dtype=Array(Float32),
            description="L2-normalised 384-d all-MiniLM-L6-v2 embedding of title, genres and text",
        ),
        Field(name="genres", dtype=Array(String), description="Genre names of the item"),
    ],
    source=item_content_source,
    tags={"owner": "recloop", "entity": "item", "refresh": "batch", "encoder": "all-MiniLM-L6-v2"},
)
