"""Item-based explanations: which history items a recommended item is closest to ("because you ...").

The explanation of a recommended item is the history items nearest to it by cosine similarity of the
model's item embeddings, the item-to-item form of explanation of Herlocker, Konstan & Riedl,
"Explaining Collaborative Filtering Recommendations", CSCW 2000 ("because you liked ..."), and of
Sarwar et al.'s item-based CF (WWW 2001). Deviation: the similarity is the sequential model's tied
output embeddings, not co-rating cosine, so it is a post-hoc account of the model's neighbourhood, not
an exact attribution of the transformer's score. Pure numpy.
"""

from __future__ import annotations

import numpy as np

#: At most this many history items explain one recommendation.
MAX_BECAUSE = 3


def nearest_history(history_emb: np.ndarray, item_emb: np.ndarray, n: int = MAX_BECAUSE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each recommended item, the ``n`` history items most similar to it (best first).

    Args:
        history_emb: (n_history, d_model) embeddings of the user's distinct history items.
        item_emb: (n_recommended, d_model) embeddings of the recommended items.
        n: explanations per item (>= 1).
    Returns:
        (positions, weights), each (n_recommended, n') with n' = min(n, n_history): positions into the
        history (most similar first; ties to the later, i.e. more recent, history item) and their cosine
        similarity in [-1, 1]. Callers keep the positive ones (and at least the first).
    Raises:
        ValueError: n < 1 or d_model differs.
    """
    if n < 1:
        raise ValueError(f"n={n}; expected >= 1")
    h = np.asarray(history_emb, dtype=np.float64)
    e = np.asarray(item_emb, dtype=np.float64)
    if h.ndim != 2 or e.ndim != 2 or h.shape[1] != e.shape[1]:
        raise ValueError(f"history_emb {h.shape} and item_emb {e.shape}: expected (n_history, d) and (n_items, d)")
    if h.shape[0] == 0:
        return np.zeros((e.shape[0], 0), dtype=np.int64), np.zeros((e.shape[0], 0))
    hn = np.linalg.norm(h, axis=1, keepdims=True)
    en = np.linalg.norm(e, axis=1, keepdims=True)
    h = np.divide(h, hn, out=np.zeros_like(h), where=hn > 0)
    e = np.divide(e, en, out=np.zeros_like(e), where=en > 0)
    sims = e @ h.T  # (n_recommended, n_history)
    kk = min(n, h.shape[0])
    # reversed columns + stable sort: equal similarities go to the more recent history item
    order = (h.shape[0] - 1 - np.argsort(-sims[:, ::-1], axis=1, kind="stable"))[:, :kk]
    return order.astype(np.int64), np.take_along_axis(sims, order, axis=1)
