"""Text-aware items outside training: text matrices, serving's frozen item table with new items appended, the
content-only baseline, query blending, and the cold-item temporal protocol (two cuts, every later event a case,
windows sized to hold ``MIN_COLD_TARGETS`` cold targets; a cluster bootstrap over users for the intervals).

The model side (an item's vector = ID embedding + a learned projection of its frozen text embedding, or the
projection alone) is in ``models.contract.ItemSequenceModel`` (``item_repr``). A new item has no ID embedding:
its vector is the projection of its text (``cold_vectors``), appended after the catalogue's rows
(``ItemTable``), so a text-aware model scores it without a retrain. This follows the text-based item
representations of UniSRec (Hou et al., KDD 2022) and Recformer (Li et al., KDD 2023), reduced to one linear
adaptor over a frozen sentence encoder. Pure: arrays in, arrays or tensors out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from models.contract import select_candidates
from models.sequences import EvalSet, Split, _sorted_events
from models.vocab import PAD_IDX, ItemVocabulary


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (zero rows stay zero). (n, d) -> (n, d) float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def text_matrix(ids: Sequence[str], text_by_id: Mapping[str, np.ndarray], d_text: int) -> np.ndarray:
    """The (len(ids) + 1, d_text) float32 text matrix of ``ids`` in index order; row 0 (padding) and items
    without text are zero.

    Args:
        ids: item ids in index order (``ItemVocabulary.ids``: ``ids[k]`` is item_idx k + 1).
        text_by_id: item_id -> (d_text,) embedding.
        d_text: the embedding width.
    Raises:
        ValueError: an embedding's width is not ``d_text``.
    """
    out = np.zeros((len(ids) + 1, d_text), dtype=np.float32)
    for k, item_id in enumerate(ids, start=1):
        vec = text_by_id.get(str(item_id))
        if vec is not None:
            vec = np.asarray(vec, dtype=np.float32)
            if vec.shape != (d_text,):
                raise ValueError(f"text embedding of item {item_id!r} has shape {vec.shape}; expected ({d_text},)")
            out[k] = vec
    return out


@torch.inference_mode()
def cold_vectors(model: Any, text: np.ndarray) -> Tensor:
    """Item vectors of items without an ID embedding: the model's projection of their text (plus its learned
    shared ID vector with ``cold_id``; ``ItemSequenceModel.cold_item_vectors``).

    Args:
        model: a text-aware ``ItemSequenceModel`` (``uses_text``).
        text: (n_new, d_text) text embeddings (L2-normalised, like the training buffer).
    Returns:
        (n_new, d_model) float32 tensor on the model's device.
    Raises:
        ValueError: the model is ID-only.
    """
    if not getattr(model, "uses_text", False):
        raise ValueError("an ID-only model cannot embed new items from their text (item_repr='id')")
    weight = model.text_proj.weight
    return model.cold_item_vectors(torch.as_tensor(np.asarray(text, dtype=np.float32), device=weight.device)).float()


class ItemTable:
    """A served view of a text-aware model: its item vectors computed once (eval mode), new items appended.

    Scores ``(batch, n_items + 1 + n_new)``: the catalogue's columns, then the new items' (item_idx
    ``n_items + 1 + j``), which may also appear in a history. Per request it costs what the ID-only model costs
    (one lookup table, one product), not a projection of the catalogue's text.

    Args:
        model: a text-aware ``ItemSequenceModel`` in eval mode.
        extra: optional (n_new, d_model) vectors of new items (``cold_vectors``).
    """

    def __init__(self, model: Any, extra: Tensor | None = None) -> None:
        self.model = model
        self.config = model.config
        self.name = model.name
        with torch.inference_mode():
            base = model.item_embeddings().detach().float()  # (n_items + 1, d_model)
            self.table = base if extra is None or len(extra) == 0 else torch.cat([base, extra.to(base)], dim=0)
        self.n_new = int(self.table.shape[0] - base.shape[0])

    def eval(self) -> ItemTable:
        return self

    def item_embeddings(self) -> Tensor:
        """(n_items + 1 + n_new, d_model) item vectors; row 0 is padding."""
        return self.table

    def score(self, item_idx: Tensor, candidate_idx: Tensor | None = None) -> Tensor:
        """``ItemSequenceModel.score`` over this table: (batch, seq_len) -> (batch, n_items + 1 + n_new)."""
        return self.model.score_with_table(item_idx, self.table, candidate_idx)


class ContentScorer:
    """The content-only baseline: the cosine of each item's text embedding with the user's mean history text
    embedding (no learning). Follows the classic content-based profile (Lops, de Gemmis & Semeraro,
    "Content-based Recommender Systems", Recommender Systems Handbook 2011).

    Args:
        text: (n_rows, d_text) text embeddings, row k = item_idx k (row 0 padding); rows are L2-normalised here.
    """

    def __init__(self, text: np.ndarray) -> None:
        self.unit = torch.from_numpy(l2_normalise(text))  # (n_rows, d_text)

    @torch.inference_mode()
    def score(self, item_idx: Tensor, candidate_idx: Tensor | None = None) -> Tensor:
        """(batch, seq_len) int64 left-padded histories -> (batch, n_rows) cosine scores, column 0 = -inf.

        An empty history scores every item 0.
        """
        idx = torch.as_tensor(item_idx, dtype=torch.long)
        profile = self.unit[idx].sum(dim=1)  # (batch, d_text); padding rows are zero
        profile = torch.nn.functional.normalize(profile, dim=1)
        scores = profile @ self.unit.T  # (batch, n_rows)
        scores[:, PAD_IDX] = float("-inf")
        return select_candidates(scores, candidate_idx)


class PaddedScorer:
    """An ID-only scorer over an index space with ``n_new`` more columns, which it scores -inf (it cannot rank
    items it has no embedding for: 0 on them by construction)."""

    def __init__(self, scorer: Any, n_new: int) -> None:
        self.scorer, self.n_new = scorer, int(n_new)
        cfg = getattr(scorer, "config", None)
        self.n_items = None if cfg is None else int(cfg.n_items)
        # no config: the ranking path hands over whole histories, so new items are dropped before the model keeps
        # its last max_seq_len (the model truncates), as serving drops unknown items before truncating
        self.config = None

    def score(self, item_idx: Tensor, candidate_idx: Tensor | None = None) -> Tensor:
        """(batch, seq_len) histories -> (batch, n_items + 1 + n_new). New items in a history (index above
        ``n_items``) are dropped from it (the rest left-padded again, order kept): the model cannot embed them."""
        idx = torch.as_tensor(item_idx, dtype=torch.long)
        n_items = self.n_items
        if n_items is not None and bool((idx > n_items).any()):
            idx = torch.where(idx > n_items, torch.zeros_like(idx), idx)
            order = torch.sort((idx != 0).to(torch.int8), dim=1, stable=True).indices  # padding first, order kept
            idx = idx.gather(1, order)
        scores = self.scorer.score(idx)
        pad = torch.full((scores.shape[0], self.n_new), float("-inf"), dtype=scores.dtype)
        return torch.cat([scores, pad], dim=1)


class NewItemsOnly:
    """A scorer restricted to the new items: every column up to ``n_vocab`` (the vocabulary's items) is -inf, so a
    target new item is ranked among the new items only (the "new arrivals" view of cold-start evaluation, as in
    the cold-item protocols of DropoutNet, Volkovs et al. NeurIPS 2017, where candidates are the cold items).

    Args:
        scorer: any scorer whose ``score(item_idx)`` returns (batch, n_rows) with the new items after ``n_vocab``.
        n_vocab: the vocabulary's size (new items are item_idx ``n_vocab + 1`` onwards).
    """

    def __init__(self, scorer: Any, n_vocab: int) -> None:
        self.scorer, self.n_vocab = scorer, int(n_vocab)
        self.config = getattr(scorer, "config", None)

    def score(self, item_idx: Tensor, candidate_idx: Tensor | None = None) -> Tensor:
        """(batch, seq_len) histories -> (batch, n_rows) scores, the vocabulary's columns -inf."""
        scores = torch.as_tensor(self.scorer.score(item_idx)).clone()
        scores[:, : self.n_vocab + 1] = float("-inf")
        return select_candidates(scores, candidate_idx)


def subset(eval_set: EvalSet, mask: np.ndarray) -> EvalSet:
    """The cases of ``eval_set`` where ``mask`` ((n,) bool) is true, in order."""
    rows = np.flatnonzero(np.asarray(mask, dtype=bool))
    return EvalSet(eval_set.user_ids[rows], [eval_set.histories[i] for i in rows], eval_set.targets[rows])


def blend_query(scores: np.ndarray, sims: np.ndarray, weight: float) -> np.ndarray:
    """Blend a user's sequence scores with the items' similarity to a text query.

    Both are standardised over the finite entries (z-scores, so logits and cosines share a scale), then
    ``(1 - weight) * z(scores) + weight * z(sims)``; entries that are -inf in ``scores`` (padding, masked)
    stay -inf. ``weight`` 0 keeps the model's order, 1 ranks by the query alone.

    Args:
        scores: (n_rows,) float scores, -inf = excluded.
        sims: (n_rows,) cosine similarity of each item's text embedding with the query's.
        weight: in [0, 1].
    Returns:
        (n_rows,) float64 blended scores.
    Raises:
        ValueError: weight outside [0, 1] or shapes differ.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"query weight={weight}; expected in [0, 1]")
    scores = np.asarray(scores, dtype=np.float64)
    sims = np.asarray(sims, dtype=np.float64)
    if scores.shape != sims.shape:
        raise ValueError(f"scores {scores.shape} and sims {sims.shape} differ")
    finite = np.isfinite(scores)
    out = np.full_like(scores, -np.inf)
    if not finite.any():
        return out

    def z(x: np.ndarray) -> np.ndarray:
        sd = x.std()
        return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)

    out[finite] = (1.0 - weight) * z(scores[finite]) + weight * z(sims[finite])
    return out


#: Cold targets each evaluation window (validation and test) must hold at least: with fewer, NDCG@10 on cold
#: targets is noise (7 cold targets, the first protocol on ml-100k, left every model at 0).
MIN_COLD_TARGETS = 200
#: Share of the events each of the validation and the test window takes, tried in this order (the latest cuts
#: first); the first share whose windows both hold ``MIN_COLD_TARGETS`` cold targets is used.
WINDOW_SHARES: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3)


@dataclass
class ColdSplit:
    """The cold-item temporal protocol's data (``cold_temporal_split``).

    Attributes:
        split: training sequences (events before the validation cut) with ``valid`` = each training user's last
            pre-cut item (early stopping inside the trainer; warm by construction) and ``test`` = ``test`` below.
        vocab: items seen before the validation cut (the models' ID vocabulary).
        new_ids: the other catalogue items, indexed after it (item_idx ``len(vocab) + 1 + j``).
        valid, test: one case per positive event in the validation / test window with at least one earlier
            positive of the same user: history = all the user's earlier positives (any window), target = the event.
        valid_cold, test_cold: (n_cases,) bool: the target has no event before the validation cut.
        protocol: the cuts, the shares, the counts.
    """

    split: Split
    vocab: ItemVocabulary
    new_ids: list[str]
    valid: EvalSet
    test: EvalSet
    valid_cold: np.ndarray
    test_cold: np.ndarray
    protocol: dict[str, Any]


def _window_counts(frame: pd.DataFrame, share: float) -> tuple[Any, Any, int, int]:
    """(validation cut, test cut, cold targets in the validation window, in the test window) of one share."""
    ts = frame["timestamp"]
    t_v, t_c = ts.quantile(1.0 - 2 * share), ts.quantile(1.0 - share)
    known = set(frame.loc[ts < t_v, "item_id"])
    has_history = frame.groupby("user_id", sort=False).cumcount() >= 1
    cold = has_history & ~frame["item_id"].isin(known)
    return t_v, t_c, int((cold & (ts >= t_v) & (ts < t_c)).sum()), int((cold & (ts >= t_c)).sum())


def cold_temporal_split(events: pd.DataFrame, catalogue_ids: Sequence[str], share: float | None = None,
                        min_cold: int = MIN_COLD_TARGETS) -> ColdSplit:
    """A global temporal split with a validation and a test window whose targets may be items first seen after
    the training cut (cold items), every event of a window being a target.

    Two cuts at the ``1 - 2 * share`` and ``1 - share`` quantiles of the (positive) events' timestamps. Models train
    on the events before the first cut (their vocabulary: the items seen there); they are validated on the events
    between the cuts and tested once on the events after the second, each event (of a user with at least one
    earlier positive) being one case whose history is all of the user's earlier positives: successive evaluation
    without retraining, as a model served between two retrains sees it. A target item without an event before the
    first cut is cold: it has no ID embedding (the catalogue items the vocabulary lacks are indexed after it, as
    serving appends new items). ``share=None`` takes the first of ``WINDOW_SHARES`` whose two windows each hold
    ``min_cold`` cold targets (a choice on counts only, never on a model's score; the last share when none does,
    with ``min_cold_met`` false). One global cut follows Sun et al., "Take a Fresh Look at Recommender Systems from an
    Evaluation Standpoint", SIGIR 2023; the cold-item segment, the cold-start literature (e.g. Volkovs et al.,
    DropoutNet, NeurIPS 2017). Events on items outside the catalogue and the vocabulary are dropped (counted).

    Args:
        events: contract events (positives only: the caller applies the event policy).
        catalogue_ids: every item id of the catalogue (items with text: the new-item candidates).
        share: each window's share of the events, in (0, 0.5); None chooses it (above).
        min_cold: the cold targets each window should hold when ``share`` is None.
    Returns:
        A ``ColdSplit``.
    Raises:
        ValueError: share outside (0, 0.5), or an empty side.
    """
    if share is not None and not 0.0 < share < 0.5:
        raise ValueError(f"share={share}; expected a value in (0, 0.5)")
    frame = _sorted_events(events).reset_index(drop=True)
    frame["item_id"] = frame["item_id"].astype(str)
    frame["user_id"] = frame["user_id"].astype(str)
    tried: dict[str, list[int]] = {}
    if share is None:
        for share in WINDOW_SHARES:
            t_v, t_c, n_valid, n_test = _window_counts(frame, share)
            tried[str(share)] = [n_valid, n_test]
            if n_valid >= min_cold and n_test >= min_cold:
                break
    t_v, t_c, n_valid, n_test = _window_counts(frame, share)
    ts = frame["timestamp"]
    past = frame[ts < t_v]
    if past.empty or (ts >= t_c).sum() == 0 or ((ts >= t_v) & (ts < t_c)).sum() == 0:
        raise ValueError(f"cuts at share {share} leave an empty side")
    vocab = ItemVocabulary.from_ids(past["item_id"])
    new_ids = sorted({str(i) for i in catalogue_ids} - set(vocab.ids))
    extended = ItemVocabulary(list(vocab.ids) + new_ids)
    inside = frame["item_id"].isin(set(extended.ids))
    dropped = int((~inside).sum())
    frame = frame[inside]
    idx = np.asarray(extended.encode(frame["item_id"]), dtype=np.int64)
    window = np.where(frame["timestamp"] < t_v, 0, np.where(frame["timestamp"] < t_c, 1, 2))
    cases: dict[int, tuple[list, list, list]] = {1: ([], [], []), 2: ([], [], [])}
    train, v_users, v_hist, v_tgt = {}, [], [], []
    n_vocab = len(vocab)
    for user, pos in frame.groupby("user_id", sort=True).indices.items():
        seq, win = idx[pos], window[pos]
        n_past = int((win == 0).sum())  # the windows are in time order: the past comes first
        past_seq = seq[:n_past]
        if n_past >= 2:
            train[user] = past_seq[:-1]
            v_users.append(user)
            v_hist.append(past_seq[:-1])
            v_tgt.append(past_seq[-1])
        elif n_past:
            train[user] = past_seq
        for i in range(max(n_past, 1), len(seq)):
            users, hist, tgt = cases[int(win[i])]
            users.append(user)
            hist.append(seq[:i])
            tgt.append(seq[i])

    def eval_set(w: int) -> EvalSet:
        users, hist, tgt = cases[w]
        return EvalSet(np.asarray(users, dtype=object), hist, np.asarray(tgt, dtype=np.int64))

    valid, test = eval_set(1), eval_set(2)
    valid_cold, test_cold = valid.targets > n_vocab, test.targets > n_vocab
    protocol = {
        "split": "temporal_cold_successive",
        "share": share,
        "shares_tried": tried or None,
        "min_cold_targets": min_cold,
        "min_cold_met": bool(valid_cold.sum() >= min_cold and test_cold.sum() >= min_cold),
        "valid_cut": pd.Timestamp(t_v).isoformat(),
        "test_cut": pd.Timestamp(t_c).isoformat(),
        "tie_break": "stable sort on (received_at or timestamp, row order)",
        "target": "every positive event in the window of a user with an earlier positive; history = all earlier "
                  "positives (cold: the item has no event before the validation cut)",
        "n_users": int(frame["user_id"].nunique()),
        "n_train_users": len(train),
        "n_valid_cases": len(valid),
        "n_valid_cold": int(valid_cold.sum()),
        "n_valid_users": int(len(set(valid.user_ids))),
        "n_test_cases": len(test),
        "n_test_cold": int(test_cold.sum()),
        "n_test_users": int(len(set(test.user_ids))),
        "n_test_cold_users": int(len(set(test.user_ids[test_cold]))),
        "n_items_before_cut": n_vocab,
        "n_new_items": len(new_ids),
        "n_events_dropped_not_in_catalogue": dropped,
    }
    split = Split(train=train, valid=EvalSet(np.asarray(v_users, dtype=object), v_hist,
                                             np.asarray(v_tgt, dtype=np.int64)),
                  test=test, protocol=protocol, vocab=vocab)
    return ColdSplit(split, vocab, new_ids, valid, test, valid_cold, test_cold, protocol)


def bootstrap_interval(values: np.ndarray, seed: int = 0, n_boot: int = 2000, level: float = 0.95,
                       groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement; seeded).

    With ``groups`` ((n,) labels, e.g. the user of each case) whole groups are resampled (the cluster bootstrap:
    cases of one user are not independent), and each replicate's mean is over its cases. Returns (nan, nan) for an
    empty array.
    """
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is not None:
        _, g = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        sums, counts = np.bincount(g, weights=values), np.bincount(g).astype(np.float64)
        pick = rng.integers(0, len(sums), size=(n_boot, len(sums)))
        means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
        lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
        return float(lo), float(hi)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
