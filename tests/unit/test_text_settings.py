"""The text path's settings reach a text-aware model trained from scratch (flows.train.text_path_params)."""

from __future__ import annotations

from flows.train import text_path_params
from models.factory import build_config
from recloop.settings import Settings


def test_text_path_settings_apply_to_text_aware_models_only_and_build_a_valid_config() -> None:
    on = Settings(text_norm=True, id_dropout=0.3, cold_id=True)
    assert text_path_params("id", on) == {}
    assert text_path_params("id", on, {"max_seq_len": 100}) == {"max_seq_len": 100}  # the given params pass through
    assert text_path_params("text", on) == {"text_norm": True}  # no ID part: nothing to drop
    params = text_path_params("id+text", on)
    assert params == {"text_norm": True, "id_dropout": 0.3, "cold_id": True, "id_expectation": True}
    cfg = build_config("sasrec", n_items=5, max_seq_len=4, item_repr="id+text", d_text=3, **params)
    assert cfg.cold_id and cfg.id_dropout == 0.3 and cfg.id_expectation
    # cold_id and id_expectation are about dropped IDs: without ID dropout they are off, not an invalid config
    off = text_path_params("id+text", Settings(id_dropout=0.0, cold_id=True))
    assert off["cold_id"] is False and off["id_expectation"] is False
    build_config("gru4rec", n_items=5, max_seq_len=4, item_repr="id+text", d_text=3, **off)
    # explicit or tuned parameters win, and an explicit id_dropout 0 turns the settings' cold_id off with it
    given = text_path_params("id+text", on, {"item_repr": "id+text", "id_dropout": 0.0})
    assert given["id_dropout"] == 0.0 and given["cold_id"] is False and given["id_expectation"] is False
    build_config("sasrec", n_items=5, max_seq_len=4, d_text=3, **given)


def test_text_path_settings_read_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("RECLOOP_TEXT_NORM", "false")
    monkeypatch.setenv("RECLOOP_ID_DROPOUT", "0.25")
    monkeypatch.setenv("RECLOOP_COLD_ID", "0")
    monkeypatch.setenv("RECLOOP_ID_EXPECTATION", "false")
    s = Settings()
    assert (s.text_norm, s.id_dropout, s.cold_id, s.id_expectation) == (False, 0.25, False, False)
