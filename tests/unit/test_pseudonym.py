"""Pseudonymous user ids (recloop/pseudonym.py): the keyed hash, its use at ingestion, the setting's checks."""

from __future__ import annotations

import hashlib
import hmac

import pandas as pd
import pytest
from pydantic import SecretStr

from recloop.pseudonym import PSEUDONYM_HEX, Pseudonymizer, from_settings, identity_or
from recloop.settings import Settings

KEY = "k" * 24


def test_a_pseudonym_is_the_keyed_hash_of_the_normalised_id() -> None:
    p = Pseudonymizer(KEY.encode())
    expected = "p" + hmac.new(KEY.encode(), b"user-42", hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]
    assert p("user-42") == expected and len(expected) == 1 + PSEUDONYM_HEX
    assert p(" user-42 ") == p("user-42")  # the contract's normalised form (surrounding blanks stripped)
    assert p(42) == p("42")  # a numeric id is its text
    assert p("user-42") != Pseudonymizer(b"another key, long enough")("user-42")  # keyed: no key, no match
    assert p("user-42") != p("user-43")


@pytest.mark.parametrize("bad", ["", "   ", None, "a\x00b", "x" * 300])
def test_an_id_the_contract_refuses_is_left_for_the_gate(bad: object) -> None:
    assert Pseudonymizer(KEY.encode())(bad) is bad


def test_a_frame_is_mapped_per_distinct_id_and_not_in_place() -> None:
    p = Pseudonymizer(KEY.encode())
    df = pd.DataFrame({"user_id": ["a", "b", "a", ""], "item_id": ["1", "2", "3", "4"]})
    out = p.frame(df)
    assert out["user_id"].tolist() == [p("a"), p("b"), p("a"), ""] and df["user_id"].tolist() == ["a", "b", "a", ""]
    assert out["item_id"].tolist() == df["item_id"].tolist()
    assert p.frame(None) is None and p.frame(pd.DataFrame({"x": [1]}))["x"].tolist() == [1]


def test_the_setting_needs_a_shared_secret(tmp_path) -> None:
    assert from_settings(Settings(home=tmp_path)) is None
    assert identity_or(Settings(home=tmp_path))("u1") == "u1"
    with pytest.raises(ValueError, match="RECLOOP_PSEUDONYM_KEY"):
        from_settings(Settings(home=tmp_path, pseudonymize_user_ids=True))
    with pytest.raises(ValueError, match="at least 16"):
        from_settings(Settings(home=tmp_path, pseudonymize_user_ids=True, pseudonym_key=SecretStr("short")))
    on = Settings(home=tmp_path, pseudonymize_user_ids=True, pseudonym_key=SecretStr(KEY))
    assert from_settings(on)("u1") == Pseudonymizer(KEY.encode())("u1") == identity_or(on)("u1")
    assert KEY not in repr(on) and KEY not in repr(from_settings(on))  # the secret is never printed
