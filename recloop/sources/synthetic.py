"""The embedded default source: a seeded synthetic interaction log that is worth learning from.

Generative story (all randomness from ``numpy.random.default_rng(seed)``):

1. Items get one or two of ``GENRES`` and a Zipf(``alpha``) base popularity over a random
   permutation, so the top 10 % of items draw about half of all events (long tail).
2. ``n_clusters`` taste clusters each prefer two genres; each user belongs to one cluster.
3. Each cluster has a sparse first-order Markov chain: every item has ``n_successors``
   successors drawn from the cluster's preferred items. A user's next item follows the chain
   with probability ``p_follow``, else it is drawn from the cluster's taste distribution
   (popularity x genre affinity), else (``p_explore``) from global popularity. The chain is what
   a sequential model can learn and a popularity model cannot.
4. Users start at a uniform time in a 180-day window from ``start``; gaps are exponential
   within sessions (mean 3 min) with a session break (mean 2 days) after ~8 events.

Deviation from reality kept on purpose: no drift and no repeated consumption, so the sequential
signal is stationary and easy to test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop.contract import EventType
from recloop.sources.base import SourceFrames, register

GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Horror",
    "Romance",
    "Sci-Fi",
    "Thriller",
)
_ADJ = (
    "Silent",
    "Broken",
    "Golden",
    "Last",
    "Hidden",
    "Crimson",
    "Electric",
    "Lost",
    "Wild",
    "Frozen",
    "Midnight",
    "Secret",
    "Burning",
    "Distant",
    "Iron",
    "Velvet",
)
_NOUN = (
    "Harbor",
    "Empire",
    "Garden",
    "Signal",
    "Road",
    "Kingdom",
    "Mirror",
    "River",
    "Engine",
    "Promise",
    "Orchard",
    "Frontier",
    "Echo",
    "Station",
    "Lantern",
    "Horizon",
)
_BLURB = {
    "Action": "explosive chases",
    "Adventure": "a perilous journey",
    "Animation": "hand-drawn wonder",
    "Comedy": "sharp jokes",
    "Crime": "a heist gone wrong",
    "Documentary": "true events",
    "Drama": "a family torn apart",
    "Fantasy": "ancient magic",
    "Horror": "something in the dark",
    "Romance": "an unlikely love",
    "Sci-Fi": "a distant future",
    "Thriller": "a race against time",
}
#: The positive interaction types the synthetic users generate, with their shares (contract names).
EVENT_TYPE_P: dict[EventType, float] = {"view": 0.5, "click": 0.35, "like": 0.1, "purchase": 0.05}


@register("synthetic")
def read_synthetic(path: Path | None = None, **options: Any) -> SourceFrames:
    """Generate the synthetic log (``path`` is ignored).

    Args:
        options: ``seed`` (default 42), ``n_users`` (1,000), ``n_items`` (500), ``n_events``
            (50,000), ``n_clusters`` (8), ``alpha`` (0.8), ``p_follow`` (0.6), ``p_explore`` (0.1),
            ``n_successors`` (3), ``start`` (ISO date, default 2024-01-01 UTC), ``source_name``.
    Returns:
        Frames with ids ``u0001`` / ``i0001``; events of types view/click/like/purchase (value null).
    Raises:
        ValueError: a size below its minimum (n_users >= 1, n_items >= 10, n_events >= 2 * n_users).
    """
    seed = int(options.get("seed", 42))
    n_users = int(options.get("n_users", 1000))
    n_items = int(options.get("n_items", 500))
    n_events = int(options.get("n_events", 50_000))
    if n_users < 1 or n_items < 10 or n_events < 2 * n_users:
        raise ValueError(
            f"n_users={n_users}, n_items={n_items}, n_events={n_events}; expected "
            "n_users >= 1, n_items >= 10, n_events >= 2 * n_users"
        )
    rng = np.random.default_rng(seed)
    source = options.get("source_name", "synthetic")
    items, popularity, item_genres = _make_items(rng, n_items, float(options.get("alpha", 0.8)))
    n_clusters = int(options.get("n_clusters", 8))
    taste, chains, user_cluster = _make_clusters(
        rng, popularity, item_genres, n_clusters, n_users, int(options.get("n_successors", 3))
    )
    lengths = _session_lengths(rng, n_users, n_events)
    start = pd.Timestamp(options.get("start", "2024-01-01")).tz_localize(None).tz_localize("UTC")
    p_follow, p_explore = float(options.get("p_follow", 0.6)), float(options.get("p_explore", 0.1))
    user_col, item_col, ts_col = [], [], []
    for u in range(n_users):
        c = user_cluster[u]
        seq = _walk(rng, lengths[u], taste[c], chains[c], popularity, p_follow, p_explore)
        t0 = rng.uniform(0, 180 * 86400)
        gaps = rng.exponential(180.0, size=lengths[u])
        breaks = rng.random(lengths[u]) < 1 / 8
        gaps[breaks] += rng.exponential(2 * 86400.0, size=int(breaks.sum()))
        user_col.extend([f"u{u + 1:04d}"] * lengths[u])
        item_col.extend(f"i{i + 1:04d}" for i in seq)
        ts_col.append(t0 + np.cumsum(gaps))
    seconds = np.concatenate(ts_col).round(0).astype(np.int64)
    events = pd.DataFrame(
        {
            "user_id": user_col,
            "item_id": item_col,
            "event_type": rng.choice(list(EVENT_TYPE_P), size=len(item_col), p=list(EVENT_TYPE_P.values())),
            "value": np.nan,
            "timestamp": start + pd.to_timedelta(seconds, unit="s"),
            "source": source,
        }
    )
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    users = pd.DataFrame(
        {
            "user_id": [f"u{u + 1:04d}" for u in range(n_users)],
            "age": rng.integers(16, 70, size=n_users),
            "country": rng.choice(["DE", "FR", "US", "BR", "IN", "JP"], size=n_users),
        }
    )
    meta = {
        "source": source,
        "path": None,
        "synthetic_timestamps": False,
        "rating_range": None,
        "seed": seed,
        "files": {"events": f"synthetic(seed={seed})"},
        "first_line": {},
    }
    return SourceFrames(events=events, items=items, users=users, meta=meta)


def _make_items(
    rng: np.random.Generator, n_items: int, alpha: float
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    ranks = rng.permutation(n_items) + 1
    popularity = 1.0 / ranks.astype(float) ** alpha
    popularity /= popularity.sum()
    n_g = len(GENRES)
    primary = rng.integers(0, n_g, size=n_items)
    secondary = np.where(rng.random(n_items) < 0.5, rng.integers(0, n_g, size=n_items), primary)
    item_genres = np.zeros((n_items, n_g), dtype=bool)
    item_genres[np.arange(n_items), primary] = True
    item_genres[np.arange(n_items), secondary] = True
    titles, genres, texts = [], [], []
    for i in range(n_items):
        g = [GENRES[k] for k in np.flatnonzero(item_genres[i])]
        year = 1960 + int(rng.integers(0, 64))
        title = f"The {_ADJ[rng.integers(len(_ADJ))]} {_NOUN[rng.integers(len(_NOUN))]} ({year})"
        titles.append(title)
        genres.append(g)
        texts.append(f"{title}. {', '.join(g)}. A story of {' and '.join(_BLURB[x] for x in g)}.")
    items = pd.DataFrame(
        {
            "item_id": [f"i{i + 1:04d}" for i in range(n_items)],
            "title": titles,
            "genres": genres,
            "text": texts,
            "created_at": pd.Timestamp("2023-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 365, size=n_items), unit="D"),
        }
    )
    return items, popularity, item_genres


def _make_clusters(
    rng: np.random.Generator,
    popularity: np.ndarray,
    item_genres: np.ndarray,
    n_clusters: int,
    n_users: int,
    n_successors: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster: taste distribution over items (n_clusters, n_items) and successor table
    (n_clusters, n_items, n_successors); plus each user's cluster (n_users,)."""
    n_items, n_g = item_genres.shape
    taste = np.empty((n_clusters, n_items))
    chains = np.empty((n_clusters, n_items, n_successors), dtype=np.int64)
    for c in range(n_clusters):
        liked = rng.choice(n_g, size=2, replace=False)
        affinity = 0.05 + 3.0 * item_genres[:, liked].any(axis=1)
        taste[c] = popularity * affinity / (popularity * affinity).sum()
        chains[c] = rng.choice(n_items, size=(n_items, n_successors), p=taste[c])
    return taste, chains, rng.integers(0, n_clusters, size=n_users)


def _session_lengths(rng: np.random.Generator, n_users: int, n_events: int) -> np.ndarray:
    """Events per user: log-normal activity, at least 2 each, summing exactly to ``n_events``."""
    w = rng.lognormal(0.0, 0.8, size=n_users)
    lengths = 2 + np.floor(w / w.sum() * (n_events - 2 * n_users)).astype(np.int64)
    short = n_events - int(lengths.sum())
    np.add.at(lengths, rng.choice(n_users, size=short), 1)
    return lengths


def _walk(
    rng: np.random.Generator,
    length: int,
    taste: np.ndarray,
    chain: np.ndarray,
    popularity: np.ndarray,
    p_follow: float,
    p_explore: float,
) -> list[int]:
    """One user's item sequence (indices, repeats allowed) of ``length`` items."""
    n_items = len(taste)
    seq = [int(rng.choice(n_items, p=taste))]
    draws = rng.random(length)
    fallback_taste = rng.choice(n_items, size=length, p=taste)
    fallback_pop = rng.choice(n_items, size=length, p=popularity)
    for k in range(1, length):
        if draws[k] < p_follow:
            succ = chain[seq[-1]]
            nxt = int(succ[rng.integers(len(succ))])
        elif draws[k] < p_follow + p_explore:
            nxt = int(fallback_pop[k])
        else:
            nxt = int(fallback_taste[k])
        seq.append(nxt)
    return seq
