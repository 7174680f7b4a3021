"""ItemVocabulary: padding, encode/decode round trip, warm-start extension, serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from models.vocab import PAD_IDX, ItemVocabulary


def test_indices_start_at_one_and_padding_is_reserved() -> None:
    vocab = ItemVocabulary.from_ids(["b", "a", "c", "a"])
    assert len(vocab) == 3
    assert vocab.ids == ("a", "b", "c")
    assert vocab.encode(["a", "c"]).tolist() == [1, 3]
    assert PAD_IDX not in vocab.encode(vocab.ids)
    assert vocab.decode(np.array([3, 1])) == ["c", "a"]


def test_unknown_ids_raise_or_pad() -> None:
    vocab = ItemVocabulary.from_ids([1, 2])
    with pytest.raises(KeyError, match="zzz"):
        vocab.encode(["1", "zzz"])
    assert vocab.encode(["1", "zzz"], unknown="pad").tolist() == [1, 0]
    with pytest.raises(ValueError, match="unknown='skip'"):
        vocab.encode(["1"], unknown="skip")  # type: ignore[arg-type]


def test_decoding_padding_is_an_error() -> None:
    with pytest.raises(IndexError, match="0 is padding"):
        ItemVocabulary.from_ids(["a"]).decode([0])


def test_extend_keeps_existing_indices() -> None:
    old = ItemVocabulary.from_ids(["m", "z", "a"])
    new = old.extend(["b", "z", "y"])
    assert len(new) == 5
    assert new.encode(old.ids).tolist() == old.encode(old.ids).tolist()
    assert new.encode(["b", "y"]).tolist() == [4, 5]


def test_dict_round_trip_and_version_check() -> None:
    vocab = ItemVocabulary.from_ids(["x", "y"])
    assert ItemVocabulary.from_dict(vocab.to_dict()) == vocab
    bad = {**vocab.to_dict(), "version": "000000000000"}
    with pytest.raises(ValueError, match="does not match"):
        ItemVocabulary.from_dict(bad)


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(ValueError, match="duplicated"):
        ItemVocabulary(["a", "a"])


def test_small_and_large_encodes_agree_on_known_unknown_and_padding() -> None:
    from models.vocab import SMALL_ENCODE

    vocab = ItemVocabulary.from_ids(str(i) for i in range(2 * SMALL_ENCODE))
    small = ["7", "nope", 3, "0"]
    large = small * (SMALL_ENCODE // 2)  # more than SMALL_ENCODE ids: pandas' indexer
    assert len(large) > SMALL_ENCODE
    expected = vocab.encode(small, unknown="pad").tolist() * (SMALL_ENCODE // 2)
    assert vocab.encode(large, unknown="pad").tolist() == expected
    assert vocab.encode(small, unknown="pad").tolist() == [vocab.ids.index("7") + 1, 0, vocab.ids.index("3") + 1, 1]
    for ids in (small, large):
        with pytest.raises(KeyError, match="nope"):
            vocab.encode(ids)
    assert vocab.encode([]).tolist() == []
