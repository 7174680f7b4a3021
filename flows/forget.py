"""The model forgets at the next retrain: the loop's side of ``recloop.forget``.

A completed deletion leaves a receipt no cold retrain has honoured yet. The loop's next turn (``flows/loop.py``)
then retrains even without new feedback, **cold** (not warm-started from weights that saw the user), on the lake
the deletion rewrote, and records the receipts it honoured on its MLflow run (tag ``forget.honoured_receipts``
and artifact ``forget/honoured_receipts.json``: the salted hashes, never ids) and in the receipts
(``honoured_by`` = the run id). ``recloop forget USER_ID --retrain-now`` runs that turn at once.

No Prefect flow takes a user id as a parameter (Prefect would store it with the flow run): the deletion
itself runs outside Prefect (``serving.forget.forget_user``).
"""

from __future__ import annotations

import logging
from typing import Any

from recloop.forget import ForgetStore

logger = logging.getLogger(__name__)
HONOURED_TAG = "forget.honoured_receipts"
HONOURED_ARTIFACT = "forget/honoured_receipts.json"


def unhonoured_receipts(settings: Any) -> list[str]:
    """Hashes of completed deletions no cold retrain has honoured yet (empty when nobody was forgotten)."""
    with ForgetStore(settings.event_log_uri) as store:
        return store.unhonoured()


def honour_receipts(settings: Any, run_id: str, user_hashes: list[str]) -> dict[str, Any]:
    """Record that training run ``run_id`` (cold, on data without these users) honours their receipts.

    Returns:
        {"receipts": n, "run_id": run_id}.
    """
    from registry.tracking import configure_tracking

    client = configure_tracking(settings)
    client.set_tag(run_id, HONOURED_TAG, str(len(user_hashes)))
    client.log_dict(run_id, {"user_hashes": sorted(user_hashes), "trained_cold": True}, HONOURED_ARTIFACT)
    with ForgetStore(settings.event_log_uri) as store:
        n = store.honour(user_hashes, run_id)
    logger.info("forget receipts honoured n=%d run_id=%s", n, run_id)
    return {"receipts": n, "run_id": run_id}
