"""The explain stage of ``/recommend``: "because you rated / clicked / bought ..." for each recommended item.

``models.explain.nearest_history`` finds the 1-3 history items nearest to each recommended item in the
served model's item-embedding space (cosine); this module turns them into the response's ``because``
list and ``reason`` line, whose verb comes from the history event's type (``VERBS``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from models.explain import MAX_BECAUSE, nearest_history

#: The verb of a reason line by the event type of the history item that explains the recommendation.
VERBS: dict[str, str] = {
    "rating": "rated",
    "click": "clicked",
    "purchase": "bought",
    "like": "liked",
    "view": "watched",
}
DEFAULT_VERB = "chose"  # a history item whose event type is unknown (e.g. a request's history)


def reason_line(event_type: str | None, title: str) -> str:
    """``Because you <verb> <title>`` with the verb of ``event_type`` (``VERBS``; ``DEFAULT_VERB`` else)."""
    return f"Because you {VERBS.get(event_type or '', DEFAULT_VERB)} {title}"


def explain_items(items: Sequence[dict[str, Any]], history: Sequence[str], unit_emb: np.ndarray,
                  encode: Any, titles: Mapping[str, str],
                  event_types: Callable[[list[str]], Mapping[str, str]]) -> None:
    """Add ``because`` and ``reason`` to each of ``items`` in place (nothing when ``history`` is empty).

    Each item gets the history items with a positive cosine similarity among its ``MAX_BECAUSE`` nearest
    (at least the nearest one), most similar first, each as {item_id, title, weight = cosine}.

    Args:
        items: response items ({item_id, ...}), the ids known to the model.
        history: the known history ids the scores came from, oldest first (repeats allowed).
        unit_emb: (n_items + 1, d_model) L2-normalised item embeddings.
        encode: ids -> (n,) int64 item_idx (``ItemVocabulary.encode``).
        titles: item_id -> title.
        event_types: history item ids -> {item_id: the event type of the user's newest positive on it}; called
            once, with only the ids that head a ``because`` list (at most one per item).
    """
    distinct = list(dict.fromkeys(reversed(history)))[::-1]  # each item once, at its latest position
    if not items or not distinct:
        return
    h_idx = np.asarray(encode(distinct), dtype=np.int64)
    r_idx = np.asarray(encode([x["item_id"] for x in items]), dtype=np.int64)
    pos, weight = nearest_history(unit_emb[h_idx], unit_emb[r_idx], MAX_BECAUSE)  # (n_items_out, <=3) each
    lists = []
    for p_row, w_row in zip(pos, weight, strict=True):
        keep = [(int(p), float(w)) for j, (p, w) in enumerate(zip(p_row, w_row, strict=True)) if j == 0 or w > 0]
        lists.append([{"item_id": distinct[p], "title": titles.get(distinct[p], distinct[p]), "weight": round(w, 4)}
                      for p, w in keep])
    types = event_types(list(dict.fromkeys(b[0]["item_id"] for b in lists)))
    for item, because in zip(items, lists, strict=True):
        item["because"] = because
        item["reason"] = reason_line(types.get(because[0]["item_id"]), because[0]["title"])
