"""The one ranking path: score histories, mask what must not be shown, take the top k.

Evaluation (``models.metrics``), the evaluate flow, the MLflow pyfunc and serving all call these
functions; no other module ranks items.

Rules, stated once:
- a history is an (n,) int64 array of item_idx, oldest first; only the last ``max_len`` are scored
  (default: the scorer's ``config.max_seq_len``, else the whole history); an empty history is
  scored as one padding position;
- column 0 (padding) is never ranked; masked items get ``-inf`` and are never returned;
- top-k order: score descending, ties broken by the lower item_idx (deterministic);
- the rank of a held-out target is pessimistic: 1 + #{items scoring higher} + #{other items with
  the same score}, so a constant scorer ranks the target last.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from models.contract import Scorer, select_candidates
from models.sequences import pad_left
from models.vocab import PAD_IDX, ItemVocabulary


def encode_history(vocab: ItemVocabulary, item_ids: Iterable[object]) -> np.ndarray:
    """(n,) int64 item_idx of the ids ``vocab`` knows, oldest first (unknown ids dropped)."""
    idx = vocab.encode(list(item_ids), unknown="pad")
    return idx[idx != PAD_IDX]


def _max_len(scorer: Any, max_len: int | None) -> int | None:
    if max_len is not None:
        return max_len
    return getattr(getattr(scorer, "config", None), "max_seq_len", None)


def score_histories(
    scorer: Scorer, histories: Sequence[np.ndarray], *, max_len: int | None = None, batch_size: int = 512
) -> np.ndarray:
    """Raw scores of every item after each history, in batches.

    Args:
        scorer: ``score(item_idx) -> (batch, n_items + 1)``.
        histories: n arrays of item_idx, oldest first (may be empty).
        max_len: keep the last ``max_len`` items (default: the scorer's ``config.max_seq_len``).
        batch_size: histories per forward pass.
    Returns:
        (n, n_items + 1) float32; column 0 is whatever the scorer returned (masked later).
    """
    max_len = _max_len(scorer, max_len)
    parts = []
    for start in range(0, len(histories), batch_size):
        chunk = list(histories[start : start + batch_size])
        longest = max(max((len(h) for h in chunk), default=1), 1)
        item_idx = pad_left(chunk, min(max_len, longest) if max_len else longest)  # (batch, <= max_len)
        with torch.inference_mode():
            parts.append(scorer.score(torch.from_numpy(item_idx)).float().cpu().numpy())
    if not parts:
        raise ValueError("score_histories needs at least one history")
    return np.concatenate(parts, axis=0)


def seen_mask(histories: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """(n, n_items + 1) bool, True where the item is in the history (padding column False)."""
    mask = np.zeros((len(histories), n_items + 1), dtype=bool)
    for row, hist in enumerate(histories):
        mask[row, np.asarray(hist, dtype=np.int64)] = True
    mask[:, PAD_IDX] = False
    return mask


def mask_scores(
    scores: np.ndarray, seen: np.ndarray | None = None, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Float64 copy of (n, n_items + 1) scores with NaN, padding, ``seen`` and ``exclude`` set to -inf.

    Args:
        scores: (n, n_items + 1).
        seen: optional (n, n_items + 1) bool mask (``seen_mask``).
        exclude: optional (m,) item_idx excluded for every row.
    """
    out = np.array(scores, dtype=np.float64, copy=True)
    out[np.isnan(out)] = -np.inf  # a diverged model's NaN never ranks first (nor wins a metric)
    out[:, PAD_IDX] = -np.inf
    if seen is not None:
        out[seen] = -np.inf
    if exclude is not None and len(exclude):
        out[:, np.asarray(exclude, dtype=np.int64)] = -np.inf
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(n, min(k, n_cols)) item_idx of the best scores per row, best first, ties by lower item_idx.

    Rows with fewer than k finite scores are filled with masked (-inf) items in index order; use
    ``top_k_items`` for one list without them.

    Raises:
        ValueError: k < 1.
    """
    if k < 1:
        raise ValueError(f"k={k}; expected >= 1")
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (n, k) unordered
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    out = np.take_along_axis(part, order, axis=1)
    # argpartition picks arbitrarily among items tied with the k-th score: redo those rows exactly.
    kth = np.take_along_axis(scores, out[:, -1:], axis=1)  # (n, 1)
    ambiguous = np.flatnonzero((scores >= kth).sum(axis=1) > k)
    for row in ambiguous:
        cols = np.arange(scores.shape[1])
        out[row] = np.lexsort((cols, -scores[row]))[:k]
    return out


def top_k_items(scores: np.ndarray, k: int) -> np.ndarray:
    """(<= k,) item_idx of the best finite entries of one (n_items + 1,) masked score row."""
    if not np.isfinite(scores).any():
        return np.zeros(0, dtype=np.int64)
    top = top_k(scores[None, :], k)[0]
    return top[np.isfinite(scores[top])]


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Pessimistic 1-based rank of each target (see the module's tie rule).

    Args:
        scores: (n, n_items + 1) already masked scores (``mask_scores``).
        targets: (n,) int64 item_idx in 1..n_items.
    Returns:
        (n,) int64 ranks.
    Raises:
        ValueError: shapes disagree or a target is padding / out of range.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != len(targets):
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} disagree on n_users")
    if len(targets) and (targets.min() < 1 or targets.max() >= scores.shape[1]):
        raise ValueError(
            f"targets must be in 1..{scores.shape[1] - 1}; got range {targets.min()}..{targets.max()}"
        )
    t = scores[np.arange(len(targets)), targets][:, None]  # (n, 1)
    greater = (scores > t).sum(axis=1)
    ties = (scores == t).sum(axis=1) - 1  # other items tied with the target
    return (1 + greater + ties).astype(np.int64)


def recommend(
    scorer: Scorer,
    vocab: ItemVocabulary,
    histories: Sequence[Iterable[object]],
    k: int = 10,
    *,
    exclude_seen: bool = True,
    exclude: Iterable[object] = (),
    max_len: int | None = None,
) -> list[list[tuple[str, float]]]:
    """Top-k (item_id, score) per history of raw item ids, best first.

    Args:
        scorer: a model or baseline in ``vocab``'s index space.
        vocab: its vocabulary; unknown history / exclude ids are ignored.
        histories: raw item ids per user, oldest first.
        k: items per list (fewer when the catalogue runs out).
        exclude_seen: never return an item of the user's history (the whole given history, not
            only the window the model reads).
        exclude: item ids never returned to anyone.
        max_len: model window (default: the scorer's ``config.max_seq_len``).
    Returns:
        One list per history of up to k pairs; padding and masked items are never returned.
    Raises:
        ValueError: k < 1.
    """
    if k < 1:
        raise ValueError(f"k={k}; expected >= 1")
    idx = [encode_history(vocab, h) for h in histories]
    if not idx:
        return []
    scores = score_histories(scorer, idx, max_len=max_len)
    masked = mask_scores(
        scores,
        seen_mask(idx, len(vocab)) if exclude_seen else None,
        encode_history(vocab, exclude),
    )
    out = []
    for row in masked:
        top = top_k_items(row, k)
        out.append(list(zip(vocab.decode(top), row[top].tolist(), strict=True)))
    return out


class MappedScorer:
    """Scores a model trained on another vocabulary in this vocabulary's index space.

    Inputs (this vocabulary's indices) are mapped by item id to the model's indices (unknown items
    dropped, histories re-packed to the left); output columns are mapped back, items the model does
    not know get -inf. Used to compare a champion with a candidate on the candidate's split.
    """

    def __init__(self, model: Scorer, model_vocab: ItemVocabulary, vocab: ItemVocabulary) -> None:
        self.model = model  # no ``config``: whole histories come in, the model cuts its window after mapping
        to_model = np.zeros(len(vocab) + 1, dtype=np.int64)
        to_model[1:] = model_vocab.encode(vocab.ids, unknown="pad")  # (n_items,) 0 where unknown
        self.to_model = torch.from_numpy(to_model)  # (n_items + 1,)
        self.known = torch.from_numpy(np.flatnonzero(to_model > 0))  # this vocab's idx known to the model

    @torch.inference_mode()
    def score(self, item_idx: torch.Tensor, candidate_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq_len) item_idx in this vocabulary -> (batch, n_items + 1) scores."""
        mapped = self.to_model[torch.as_tensor(item_idx, dtype=torch.long)]  # (batch, seq_len), 0 = unknown
        order = torch.argsort((mapped > 0).int(), dim=1, stable=True)  # zeros first: left padding
        mapped = torch.gather(mapped, 1, order)
        inner = self.model.score(mapped).float()  # (batch, model n_items + 1)
        out = torch.full((mapped.shape[0], len(self.to_model)), -torch.inf)
        out[:, self.known] = inner[:, self.to_model[self.known]]
        return select_candidates(out, candidate_idx)
