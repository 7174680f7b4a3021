"""Forget a user everywhere: the handlers of every store, assembled for ``POST /forget`` and ``recloop forget``.

``recloop.forget.run_forget`` does the work (tombstone, loop lock, two passes, verification, receipt); this
module only assembles its handlers, the one place that knows them all (serving may import the kernel, the
feature store and the registry):

- the kernel's (``recloop.forget_handlers.kernel_handlers``: event log, exposure log, lake, quarantine,
  validation results and Data Docs, Feast offline source tables),
- the Feast online store (``featurestore.forget.OnlineStoreHandler``: SQLite or Redis),
- the serving process's memory (``ServingMemoryHandler``, when called from a service worker; the other
  workers and replicas see the tombstone on their next request for the user and drop it then),
- the registry (``RegistryHandler``): every existing version is tagged as holding forgotten users.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from recloop.forget import HOLDS_FORGOTTEN_TAG, log_id, run_forget

logger = logging.getLogger(__name__)


class ServingMemoryHandler:
    """This process's lake snapshot and owed pushes (``RecommenderCore.forget_memory``); flushes the
    process's queued exposures first, so the exposure pass finds them."""

    name = "serving_memory"
    repeat = True

    def __init__(self, core: Any) -> None:
        self.core = core

    def delete(self, user_id: str) -> int:
        exposures = getattr(self.core, "exposures", None)
        if exposures is not None and hasattr(exposures, "flush"):
            exposures.flush(timeout_s=2.0)
        return int(self.core.forget_memory(user_id))

    def remaining(self, user_id: str) -> int:
        return int(self.core.memory_rows(user_id))

    def durable(self) -> None:
        return None


class RegistryHandler:
    """Tags every registered version of ``settings.model_name`` with ``HOLDS_FORGOTTEN_TAG`` (it was trained
    while the user's data was in its training set): promoting or rolling back to it then needs ``--force``."""

    name = "model_registry"
    repeat = False

    def __init__(self, settings: Any, client: Any = None) -> None:
        self.settings, self.client = settings, client

    def delete(self, user_id: str) -> int:
        from registry.aliases import tag_holding_forgotten

        if self.client is None:
            from registry.tracking import configure_tracking

            self.client = configure_tracking(self.settings)
        n = tag_holding_forgotten(self.client, self.settings.model_name)
        logger.info("forget: %d registry versions tagged %s=true", n, HOLDS_FORGOTTEN_TAG)
        return n

    def remaining(self, user_id: str) -> int:
        return 0

    def durable(self) -> None:
        return None


def forget_handlers(settings: Any, *, core: Any = None, client: Any = None) -> list[Any]:
    """Every handler of ``recloop.forget.STORES`` for ``settings`` (plus this process's memory with ``core``,
    and the registry's tags). Close them with ``recloop.forget_handlers.close_handlers``."""
    from featurestore.forget import OnlineStoreHandler
    from recloop.forget_handlers import kernel_handlers

    handlers = [*kernel_handlers(settings), OnlineStoreHandler(settings)]
    if core is not None:
        handlers.append(ServingMemoryHandler(core))
    handlers.append(RegistryHandler(settings, client))
    return handlers


def forget_user(user_id: str, settings: Any, *, core: Any = None, client: Any = None,
                lock_timeout_s: float | None = None, settle_s: float | None = None,
                background: bool = False) -> dict[str, Any]:
    """Forget ``user_id`` in every store (``recloop.forget.run_forget`` over ``forget_handlers``).

    Args:
        user_id: the raw id.
        settings: ``recloop.settings.Settings``.
        core: the calling service worker's ``RecommenderCore`` (its memory is cleared too), or None.
        client: an ``MlflowClient`` (default: ``registry.tracking.configure_tracking(settings)``).
        lock_timeout_s: wait for the loop's lock at most this long (None: until the turn ends).
        settle_s: pause before the second pass (default ``settings.forget_settle_s``).
        background: when the lock was not free in time, finish in a daemon thread of this process (the
            answer says "pending"; the tombstone already holds everywhere).
    Returns:
        ``recloop.forget.ForgetResult.as_dict()``: user_hash, status, rows per store, seconds, new_request.
    Raises:
        ValueError: a bad user id.
        recloop.forget.ForgetIncomplete: rows were left after both passes (re-run it).
    """
    from recloop.forget_handlers import close_handlers

    settle = settings.forget_settle_s if settle_s is None else settle_s
    handlers = forget_handlers(settings, core=core, client=client)
    try:
        result = run_forget(user_id, settings, handlers, lock_timeout_s=lock_timeout_s, settle_s=settle)
    finally:
        close_handlers(handlers)
    if result.status == "pending" and background:
        def finish() -> None:
            try:
                forget_user(user_id, settings, core=core, client=client, lock_timeout_s=None, settle_s=settle)
            except Exception:  # noqa: BLE001 - the receipt stays pending; `recloop forget` re-runs it
                logger.exception("background forget failed user=%s", log_id(user_id))

        threading.Thread(target=finish, name="forget", daemon=True).start()
    return result.as_dict()
