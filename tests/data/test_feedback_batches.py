"""The loop's gate on feedback batches: accepted API events never wedge the loop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd

from recloop.lake import Lake
from recloop.settings import get_settings
from recloop.sources import load_source


def _feedback(n_good: int) -> pd.DataFrame:
    now = datetime.now(UTC)
    rows = [
        {"event_id": f"g{i}", "user_id": "u0002", "item_id": "i0010", "event_type": "click", "value": None,
         "timestamp": now - timedelta(seconds=n_good - i), "source": "api"}
        for i in range(n_good)
    ]
    rows += [
        {"event_id": "bad-rating", "user_id": "u0002", "item_id": "i0010", "event_type": "rating", "value": 99.0,
         "timestamp": now, "source": "api"},
        {"event_id": "new-item", "user_id": "u0002", "item_id": "brand-new-item", "event_type": "click",
         "value": None, "timestamp": now, "source": "api"},
    ]
    return pd.DataFrame(rows)


def test_small_feedback_batch_with_bad_rows_and_new_items_is_not_stopped(recloop_home) -> None:
    from flows.ingest import accepted_frames, validate_frame_task

    settings = get_settings()
    Lake(settings.lake_path).ingest(load_source("synthetic", None, n_users=50, n_items=40, n_events=2000))
    outcome = validate_frame_task.fn(_feedback(5), "feedback", "feedback-1-7")
    assert not outcome.stopped
    assert outcome.rows_quarantined == 1  # the rating of 99: kept in the quarantine with its reason
    frames = accepted_frames(outcome, "feedback")
    assert "brand-new-item" in set(frames.events["item_id"])  # new items flow on to the next retrain
    assert len(frames.events) == 6
    report = Lake(settings.lake_path).ingest(frames)
    assert report.new_events == 6
