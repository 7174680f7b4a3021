"""Sequences, splits and training windows: ordering, leakage, every-position targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.sequences import (
    SequenceDataset,
    build_sequences,
    collate,
    leave_one_out,
    pad_left,
    temporal_split,
)
from models.vocab import ItemVocabulary
from recloop.contract import coerce_events


def _events(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["event_type"] = "view"
    return coerce_events(frame, default_source="test")


def test_sequences_sorted_by_time_with_stable_ties() -> None:
    events = _events([("u", "c", 30), ("u", "a", 10), ("u", "b", 10), ("v", "a", 5)])
    vocab = ItemVocabulary.from_ids(events["item_id"])
    seqs = build_sequences(events, vocab)
    assert vocab.decode(seqs["u"]) == ["a", "b", "c"]  # tie at t=10 keeps row order a, b
    assert vocab.decode(seqs["v"]) == ["a"]
    swapped = _events([("u", "c", 30), ("u", "b", 10), ("u", "a", 10)])
    assert vocab.decode(build_sequences(swapped, vocab)["u"]) == ["b", "a", "c"]


def test_leave_one_out_targets_and_short_users() -> None:
    seqs = {"u": np.array([1, 2, 3, 4]), "short": np.array([5, 6])}
    split = leave_one_out(seqs)
    assert split.train["u"].tolist() == [1, 2]
    assert split.train["short"].tolist() == [5, 6]
    assert split.valid.targets.tolist() == [3] and split.test.targets.tolist() == [4]
    assert split.valid.histories[0].tolist() == [1, 2]
    assert split.test.histories[0].tolist() == [1, 2, 3]
    assert split.protocol["n_eval_users"] == 1 and split.protocol["n_train_only_users"] == 1


def test_no_leakage_on_ml100k(ml100k_path) -> None:
    raw = pd.read_csv(ml100k_path / "u.data", sep="\t", names=["user_id", "item_id", "value", "timestamp"])
    raw["event_type"] = "rating"
    events = coerce_events(raw, default_source="ml-100k")
    vocab = ItemVocabulary.from_ids(events["item_id"])
    seqs = build_sequences(events, vocab)
    split = leave_one_out(seqs)
    data = SequenceDataset(split.train, max_len=50)
    assert len(split.test) == 943
    held_out = zip(split.test.user_ids, split.valid.targets, split.test.targets, strict=True)
    for user, valid_target, test_target in held_out:
        full, train_seq = seqs[user], split.train[user]
        assert train_seq.tolist() == full[:-2].tolist()  # a strict prefix: nothing later
        assert valid_target not in train_seq and test_target not in train_seq  # ML-100K has no repeats
    # The training windows hold exactly the training transitions, nothing else.
    n_train_tokens = sum(len(s) - 1 for s in split.train.values())
    assert int((data.targets > 0).sum()) == n_train_tokens
    keep = data.targets > 0
    got = sorted(zip(data.inputs[keep].tolist(), data.targets[keep].tolist(), strict=True))
    expected = sorted(
        (int(a), int(b)) for s in split.train.values() for a, b in zip(s[:-1], s[1:], strict=True)
    )
    assert got == expected


def test_dataset_uses_every_position_with_windows() -> None:
    seq = np.arange(1, 12)  # 11 items -> 10 transitions
    data = SequenceDataset({"u": seq}, max_len=4)
    pairs = set()
    for inputs, targets in (data[i] for i in range(len(data))):
        for x, y in zip(inputs.tolist(), targets.tolist(), strict=True):
            if y:
                assert x == y - 1  # next item
                pairs.add((x, y))
    assert pairs == {(i, i + 1) for i in range(1, 11)}
    assert data.inputs.shape == (len(data), 4)
    inputs, targets = collate([data[0], data[1]])
    assert inputs.shape == targets.shape == (2, 4)


def test_short_windows_are_left_padded() -> None:
    data = SequenceDataset({"u": np.array([7, 8, 9])}, max_len=5)
    assert data.inputs.tolist() == [[0, 0, 0, 7, 8]]
    assert data.targets.tolist() == [[0, 0, 0, 8, 9]]
    assert pad_left([np.array([1, 2, 3])], 2).tolist() == [[2, 3]]


def test_temporal_split_counts_cold_users_and_new_items() -> None:
    rows = [
        ("u", "a", 1),
        ("u", "b", 2),
        ("u", "new", 9),
        ("u", "c", 10),
        ("v", "c", 3),
        ("v", "b", 4),
        ("cold", "a", 8),
        ("v", "a", 8),
    ]  # cut at the median time 6
    split = temporal_split(_events(rows), quantile=0.5)
    assert split.vocab is not None and "new" not in split.vocab
    assert split.protocol["n_cold_users"] == 1
    assert split.protocol["n_items_unseen_before_cut"] == 1
    by_user = dict(zip(split.test.user_ids, split.test.targets, strict=True))
    assert split.vocab.decode([by_user["u"]]) == ["c"]  # first post-cut KNOWN item ("new" skipped)
    assert split.vocab.decode([by_user["v"]]) == ["a"]
    assert split.train["u"].tolist() == [1]  # past minus the validation item
    with pytest.raises(ValueError, match="quantile"):
        temporal_split(_events(rows), quantile=1.0)
