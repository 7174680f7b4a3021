"""The model registry: versions, the ``challenger`` and ``champion`` aliases, promotion and rollback.

Everything downstream (serving, the loop) follows one alias, ``settings.model_alias`` (``champion``
by default; every caller passes it, nothing here assumes its name), so moving it in the MLflow UI is a
complete promotion. The history of champions is kept as a registered-model tag
(``champion_history``: comma-separated versions, oldest first) and on each version
(``previous_champion``), so ``rollback`` can restore the previous champion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"  # per served alias: "<alias>_history" unless the alias is "champion"


def _history_tag(alias: str) -> str:
    return HISTORY_TAG if alias == "champion" else f"{alias}_history"


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: from ``previous`` (None if unset) to ``version``."""

    alias: str
    version: str
    previous: str | None


def get_alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version number an alias points to, or None when the alias (or the model) does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(client: MlflowClient, name: str, alias: str, version: str | int) -> None:
    """Point ``alias`` of registered model ``name`` at ``version``."""
    client.set_registered_model_alias(name, alias, str(version))
    logger.info("alias set model=%s alias=%s version=%s", name, alias, version)


def _history(client: MlflowClient, name: str, alias: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    raw = tags.get(_history_tag(alias), "")
    return [v for v in raw.split(",") if v]


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create registered model ``name`` if it does not exist yet."""
    if not client.search_registered_models(filter_string=f"name = '{name}'", max_results=1):
        client.create_registered_model(name, description="recloop sequential recommender (SASRec+)")


def register_version(client: MlflowClient, name: str, model_uri: str, run_id: str,
                     tags: dict[str, str] | None = None) -> ModelVersion:
    """Register the logged model at ``model_uri`` as a new version of ``name`` with ``tags``."""
    ensure_registered_model(client, name)
    mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags or {})
    logger.info("registered model=%s version=%s run_id=%s", name, mv.version, run_id)
    return mv


def set_challenger(client: MlflowClient, name: str, version: str | int) -> AliasMove:
    """Point ``challenger`` at ``version`` (a candidate that passed the gate)."""
    previous = get_alias_version(client, name, CHALLENGER)
    set_alias(client, name, CHALLENGER, version)
    return AliasMove(CHALLENGER, str(version), previous)


def promote(client: MlflowClient, name: str, version: str | int, *, alias: str, reason: str = "manual"
            ) -> AliasMove:
    """Point the served ``alias`` (``settings.model_alias``) at ``version``; record the previous one for rollback.

    Raises:
        mlflow.exceptions.MlflowException: the version does not exist.
    """
    version = str(version)
    client.get_model_version(name, version)  # raises if absent
    previous = get_alias_version(client, name, alias)
    if previous == version:
        logger.info("already served model=%s alias=%s version=%s", name, alias, version)
        return AliasMove(alias, version, previous)
    set_alias(client, name, alias, version)
    history = _history(client, name, alias)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)
    history.append(version)
    client.set_registered_model_tag(name, _history_tag(alias), ",".join(history))
    client.set_model_version_tag(name, version, "previous_champion", previous or "none")
    client.set_model_version_tag(name, version, "promoted_by", reason)
    if get_alias_version(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    logger.info("promoted model=%s alias=%s version=%s previous=%s reason=%s", name, alias, version, previous,
                reason)
    return AliasMove(alias, version, previous)


def rollback(client: MlflowClient, name: str, *, alias: str) -> AliasMove:
    """Move the served ``alias`` (``settings.model_alias``) back to the version it pointed at before.

    The current champion is taken from the alias (so a UI promotion is respected); the target is
    the last different version in ``champion_history`` before it, else the current version's
    ``previous_champion`` tag.

    Raises:
        LookupError: there is no champion, or no earlier champion to return to.
    """
    current = get_alias_version(client, name, alias)
    if current is None:
        raise LookupError(f"registered model {name!r} has no {alias!r} alias to roll back")
    history = _history(client, name, alias)
    if current in history:
        history = history[: len(history) - history[::-1].index(current) - 1]
    else:  # promoted in the UI: history does not know it
        tagged = client.get_model_version(name, current).tags.get("previous_champion", "none")
        history = history + ([tagged] if tagged != "none" else [])
    while history and history[-1] == current:
        history.pop()
    if not history:
        raise LookupError(f"registered model {name!r}: no champion before version {current} to roll back to")
    target = history[-1]
    set_alias(client, name, alias, target)
    client.set_registered_model_tag(name, _history_tag(alias), ",".join(history))
    client.set_model_version_tag(name, current, "rolled_back", f"to {target}")
    client.set_model_version_tag(name, target, "restored_from", current)
    logger.info("rolled back model=%s alias=%s from=%s to=%s", name, alias, current, target)
    return AliasMove(alias, target, current)


def list_versions(client: MlflowClient, name: str) -> list[dict[str, str]]:
    """One dict per version, newest first: version, aliases, run_id, gate decision, ndcg@10, created."""
    rows = []
    by_version: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    found = client.search_model_versions(filter_string=f"name = '{name}'", order_by=["version_number DESC"])
    for mv in found:
        rows.append({
            "version": str(mv.version),
            "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
            "run_id": mv.run_id or "",
            "gate": mv.tags.get("gate.decision", "-"),
            "ndcg@10": mv.tags.get("gate.candidate_ndcg", "-"),
            "coverage@10": mv.tags.get("gate.candidate_coverage", "-"),
            "created": str(mv.creation_timestamp),
        })
    return rows
