"""User item sequences from the events table, evaluation splits, and the training dataset.

Protocols follow the sequential-recommendation literature: leave-one-out (Kang & McAuley 2018,
SASRec; last item -> test, the one before -> validation) and a global temporal split (one time
cut for all users, as recommended by Sun et al., "Take a Fresh Look at Recommender Systems from an
Evaluation Standpoint", SIGIR 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from models.vocab import PAD_IDX, ItemVocabulary


@dataclass(frozen=True)
class EvalSet:
    """Users to evaluate: a history (model input, oldest first) and one held-out target each.

    Attributes:
        user_ids: (n_users,) object array of raw user ids.
        histories: n_users int64 arrays of item_idx, oldest first (also the 'seen' items).
        targets: (n_users,) int64 item_idx to be predicted.
    """

    user_ids: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Split:
    """Training sequences plus validation and test sets.

    Attributes:
        train: user_id -> int64 item_idx sequence used for fitting (no validation/test target in it,
            and nothing later than them).
        valid: model selection set; its histories equal the training sequences.
        test: touched once per candidate; histories = training sequence + validation item.
        protocol: how the split was made (name, counts, tie-break), reported with every result.
        vocab: the vocabulary the indices refer to when the split built it (temporal split), else None.
    """

    train: dict[str, np.ndarray]
    valid: EvalSet
    test: EvalSet
    protocol: dict[str, Any] = field(default_factory=dict)
    vocab: ItemVocabulary | None = None


#: The column that orders a history when the frame has it: the data contract's server-assigned
#: ``received_at`` (passed here as a plain name; models/ never imports the kernel). Frames without it
#: are ordered by ``timestamp``.
ORDER_COLUMN = "received_at"


def _sorted_events(events: pd.DataFrame) -> pd.DataFrame:
    missing = {"user_id", "item_id", "timestamp"} - set(events.columns)
    if missing:
        raise ValueError(f"events need columns user_id, item_id, timestamp; missing {sorted(missing)}")
    order = ORDER_COLUMN if ORDER_COLUMN in events.columns else "timestamp"
    frame = events[["user_id", "item_id", "timestamp"]].reset_index(drop=True)
    frame["_order"] = events[order].to_numpy()
    # Stable sort on (user, order time): ties keep the original row order (recorded tie-break).
    return frame.sort_values(["user_id", "_order"], kind="stable").drop(columns="_order")


def build_sequences(
    events: pd.DataFrame, vocab: ItemVocabulary, unknown: str = "raise"
) -> dict[str, np.ndarray]:
    """One chronological item_idx sequence per user. Pure.

    Events are ordered per user by (received_at if present else timestamp, original row order) with a
    stable sort, so
    timestamp ties (75 % of ML-100K ratings) resolve deterministically.

    Args:
        events: contract events frame (needs user_id, item_id, timestamp).
        vocab: maps item_id to item_idx.
        unknown: "raise" (default) or "drop" events whose item is not in ``vocab``.
    Returns:
        user_id (str) -> (n_events,) int64 array of item_idx, oldest first; users in sorted order.
    Raises:
        KeyError: an item is unknown and ``unknown="raise"``.
        ValueError: missing columns or a bad ``unknown`` option.
    """
    if unknown not in ("raise", "drop"):
        raise ValueError(f"unknown={unknown!r}; expected 'raise' or 'drop'")
    frame = _sorted_events(events)
    idx = vocab.encode(frame["item_id"], unknown="raise" if unknown == "raise" else "pad")
    keep = idx != PAD_IDX
    users = frame["user_id"].astype(str).to_numpy()[keep]
    idx = idx[keep]
    if len(idx) == 0:
        return {}
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    bounds = np.r_[starts, len(idx)]
    return {str(users[s]): idx[s:e].copy() for s, e in zip(bounds[:-1], bounds[1:], strict=True)}


def leave_one_out(seqs: dict[str, np.ndarray], min_len: int = 3) -> Split:
    """Leave-one-out split: last item -> test target, the one before -> validation target.

    Users with fewer than ``min_len`` items keep their whole sequence for training and are not
    evaluated (SASRec convention).

    Returns:
        A ``Split``; ``train[u] = seq[:-2]``, valid history ``seq[:-2]`` / target ``seq[-2]``,
        test history ``seq[:-1]`` / target ``seq[-1]``.
    Raises:
        ValueError: ``min_len < 3``.
    """
    if min_len < 3:
        raise ValueError(f"min_len={min_len}; leave-one-out needs at least 3 items per evaluated user")
    train: dict[str, np.ndarray] = {}
    users, v_hist, v_tgt, t_hist, t_tgt = [], [], [], [], []
    for user, seq in seqs.items():
        if len(seq) < min_len:
            train[user] = seq
            continue
        train[user] = seq[:-2]
        users.append(user)
        v_hist.append(seq[:-2])
        v_tgt.append(seq[-2])
        t_hist.append(seq[:-1])
        t_tgt.append(seq[-1])
    uid = np.asarray(users, dtype=object)
    protocol = {
        "split": "leave-one-out",
        "tie_break": "stable sort on (received_at or timestamp, row order)",
        "n_users": len(seqs),
        "n_eval_users": len(users),
        "n_train_only_users": len(seqs) - len(users),
        "n_interactions": int(sum(len(s) for s in seqs.values())),
    }
    return Split(
        train=train,
        valid=EvalSet(uid, v_hist, np.asarray(v_tgt, dtype=np.int64)),
        test=EvalSet(uid, t_hist, np.asarray(t_tgt, dtype=np.int64)),
        protocol=protocol,
    )


def temporal_split(events: pd.DataFrame, quantile: float = 0.9) -> Split:
    """Global temporal split: one time cut at the ``quantile`` of all event timestamps.

    Events strictly before the cut are the past: the vocabulary is built from them, and each user's
    past sequence is split leave-one-out style for training/validation (last past item = validation
    target). The test target of a user is their FIRST event at or after the cut whose item was seen
    before the cut; the test history is their whole past. Users with no past (cold start) and
    targets on items first seen after the cut cannot be scored by an id-based model: they are
    counted in ``protocol`` and excluded.

    Args:
        events: contract events frame.
        quantile: in (0, 1), the share of events (by time) before the cut.
    Returns:
        A ``Split`` with ``vocab`` set to the past-only vocabulary.
    Raises:
        ValueError: quantile outside (0, 1) or no events on one side of the cut.
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
    past_seqs = build_sequences(past, vocab)
    known = future["item_id"].astype(str).isin(set(vocab.ids))
    future_users = future["user_id"].astype(str)
    cold_users = sorted(set(future_users) - set(past_seqs))
    first = future[known & future_users.isin(set(past_seqs))].groupby("user_id", sort=True).head(1)

    train, users, v_hist, v_tgt, t_hist, t_tgt = {}, [], [], [], [], []
    target_of = dict(zip(first["user_id"].astype(str), vocab.encode(first["item_id"]), strict=True))
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
    protocol = {
        "split": "temporal",
        "quantile": quantile,
        "cut": pd.Timestamp(cut).isoformat(),
        "tie_break": "stable sort on (received_at or timestamp, row order)",
        "target": "first post-cut event on a pre-cut item",
        "n_users": int(frame["user_id"].nunique()),
        "n_eval_users": len(users),
        "n_cold_users": len(cold_users),
        "n_items_unseen_before_cut": int(future.loc[~known, "item_id"].nunique()),
        "n_future_events_on_unseen_items": int((~known).sum()),
        "n_interactions": len(frame),
    }
    return Split(
        train=train,
        valid=EvalSet(uid, v_hist, np.asarray(v_tgt, dtype=np.int64)),
        test=EvalSet(uid, t_hist, np.asarray(t_tgt, dtype=np.int64)),
        protocol=protocol,
        vocab=vocab,
    )


def pad_left(seqs: list[np.ndarray], length: int | None = None) -> np.ndarray:
    """Left-pad (and left-truncate) sequences with 0 to a (n, length) int64 array, most recent last."""
    length = length if length is not None else max((len(s) for s in seqs), default=1)
    out = np.zeros((len(seqs), max(length, 1)), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = np.asarray(seq, dtype=np.int64)[-length:] if length > 0 else seq[:0]
        if len(tail):
            out[row, -len(tail) :] = tail
    return out


class SequenceDataset(Dataset):
    """Next-item training windows that use every position of every training sequence.

    A sequence ``s`` of length n yields input ``s[:-1]`` and target ``s[1:]``; sequences longer
    than ``max_len + 1`` are cut into consecutive windows (from the most recent end) so that every
    transition is a target exactly once. Windows are left-padded with 0; target 0 means 'ignore'.

    Each item is a pair of (max_len,) int64 tensors ``(inputs, targets)``.
    """

    def __init__(
        self, seqs: dict[str, np.ndarray] | list[np.ndarray], max_len: int, all_windows: bool = True
    ):
        if max_len < 1:
            raise ValueError(f"max_len={max_len}; expected >= 1")
        values = list(seqs.values()) if isinstance(seqs, dict) else list(seqs)
        inputs, targets = [], []
        for seq in values:
            end = len(seq)
            while end >= 2:
                start = max(0, end - max_len - 1)
                window = seq[start:end]
                inputs.append(window[:-1])
                targets.append(window[1:])
                if not all_windows:
                    break
                end = start + 1  # the next window's last target is this window's first input
        self.inputs = torch.from_numpy(pad_left(inputs, max_len))
        self.targets = torch.from_numpy(pad_left(targets, max_len))

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.targets[i]


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (inputs, targets) pairs into two (batch, max_len) int64 tensors."""
    inputs, targets = zip(*batch, strict=True)
    return torch.stack(inputs), torch.stack(targets)
