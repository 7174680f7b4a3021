"""Text-aware items outside training: text matrices, serving's frozen item table with new items appended, the
content-only baseline, query blending, and the cold-item temporal split.

The model side (an item's vector = ID embedding + a learned projection of its frozen text embedding, or the
projection alone) is in ``models.contract.ItemSequenceModel`` (``item_repr``). A new item has no ID embedding:
its vector is the projection of its text (``cold_vectors``), appended after the catalogue's rows
(``ItemTable``), so a text-aware model scores it without a retrain. This follows the text-based item
representations of UniSRec (Hou et al., KDD 2022) and Recformer (Li et al., KDD 2023), reduced to one linear
adaptor over a frozen sentence encoder. Pure: arrays in, arrays or tensors out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from models.sequences import EvalSet, Split, _sorted_events, build_sequences
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
    """Item vectors of items without an ID embedding: the model's projection of their text.

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
    return model.project_text(torch.as_tensor(np.asarray(text, dtype=np.float32), device=weight.device)).float()


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
        if candidate_idx is not None:
            cand = torch.as_tensor(candidate_idx, dtype=torch.long)
            cand = cand.unsqueeze(0).expand(scores.shape[0], -1) if cand.dim() == 1 else cand
            scores = scores.gather(1, cand)
        return scores


class PaddedScorer:
    """An ID-only scorer over an index space with ``n_new`` more columns, which it scores -inf (it cannot rank
    items it has no embedding for: 0 on them by construction)."""

    def __init__(self, scorer: Any, n_new: int) -> None:
        self.scorer, self.n_new = scorer, int(n_new)
        self.config = getattr(scorer, "config", None)

    def score(self, item_idx: Tensor, candidate_idx: Tensor | None = None) -> Tensor:
        """(batch, seq_len) histories (known items only) -> (batch, n_items + 1 + n_new)."""
        idx = torch.as_tensor(item_idx, dtype=torch.long)
        scores = self.scorer.score(idx)
        pad = torch.full((scores.shape[0], self.n_new), float("-inf"), dtype=scores.dtype)
        return torch.cat([scores, pad], dim=1)


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


def cold_temporal_split(events: pd.DataFrame, catalogue_ids: Sequence[str], quantile: float = 0.9
                        ) -> tuple[Split, ItemVocabulary, list[str], np.ndarray]:
    """A global temporal split whose test targets may be items first seen after the cut (cold items).

    One time cut at the ``quantile`` of the (positive) events' timestamps. The model's vocabulary is the items
    seen before the cut; each user's past sequence is training (its last item: the validation target, as in
    ``models.sequences.temporal_split``). The test target of a user with >= 2 past items is their FIRST event
    at or after the cut, on any catalogue item; the test history is their whole past. Catalogue items not seen
    before the cut are the new items, indexed after the vocabulary (``n_items + 1 + j``); a test target on one
    is a cold target. Follows Sun et al., "Take a Fresh Look at Recommender Systems from an Evaluation
    Standpoint", SIGIR 2023 (one global cut), with the cold-item segment of the cold-start literature
    (e.g. Volkovs et al., DropoutNet, NeurIPS 2017).

    Args:
        events: contract events (positives only: the caller applies the event policy).
        catalogue_ids: every item id of the catalogue (items with text; the new-item candidates).
        quantile: in (0, 1).
    Returns:
        (split with ``vocab`` = the past vocabulary, that vocabulary, the new item ids in index order after it,
        (n_test,) bool: the test target is a cold item).
    Raises:
        ValueError: quantile outside (0, 1), or an empty side.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile={quantile}; expected a value in (0, 1)")
    frame = _sorted_events(events)
    ts = frame["timestamp"]
    cut = ts.quantile(quantile)
    past, future = frame[ts < cut], frame[ts >= cut]
    if past.empty or future.empty:
        raise ValueError(f"time cut {cut} at quantile {quantile} leaves an empty side")
    vocab = ItemVocabulary.from_ids(past["item_id"])
    new_ids = sorted({str(i) for i in catalogue_ids} - set(vocab.ids))
    extended = ItemVocabulary(list(vocab.ids) + new_ids)
    past_seqs = build_sequences(past, vocab)
    in_catalogue = future["item_id"].astype(str).isin(set(extended.ids))
    first = future[in_catalogue].groupby("user_id", sort=True).head(1)
    target_of = dict(zip(first["user_id"].astype(str), extended.encode(first["item_id"]), strict=True))
    train, users, v_hist, v_tgt, t_hist, t_tgt = {}, [], [], [], [], []
    for user, seq in past_seqs.items():
        if len(seq) < 2 or user not in target_of:
            train[user] = seq
            continue
        train[user] = seq[:-1]
        users.append(user)
        v_hist.append(seq[:-1])
        v_tgt.append(seq[-1])
        t_hist.append(seq)
        t_tgt.append(target_of[user])
    uid = np.asarray(users, dtype=object)
    targets = np.asarray(t_tgt, dtype=np.int64)
    cold = targets > len(vocab)
    protocol = {
        "split": "temporal_cold",
        "quantile": quantile,
        "cut": pd.Timestamp(cut).isoformat(),
        "tie_break": "stable sort on (received_at or timestamp, row order)",
        "target": "first post-cut event on any catalogue item (cold: the item has no pre-cut event)",
        "n_users": int(frame["user_id"].nunique()),
        "n_eval_users": len(users),
        "n_cold_targets": int(cold.sum()),
        "n_warm_targets": int((~cold).sum()),
        "n_items_before_cut": len(vocab),
        "n_new_items": len(new_ids),
    }
    split = Split(train=train, valid=EvalSet(uid, v_hist, np.asarray(v_tgt, dtype=np.int64)),
                  test=EvalSet(uid, t_hist, targets), protocol=protocol, vocab=vocab)
    return split, vocab, new_ids, cold


def bootstrap_interval(values: np.ndarray, seed: int = 0, n_boot: int = 2000, level: float = 0.95
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (users resampled with replacement; seeded).

    Returns (nan, nan) for an empty array.
    """
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
