"""The model registry: versions, the ``challenger`` and ``champion`` aliases, promotion and rollback.

Everything downstream (serving, the loop) follows the ``champion`` alias, so moving it in the MLflow
UI is a complete promotion. The history of champions is kept as a registered-model tag
(``champion_history``: comma-separated versions, oldest first) and on each version
(``previous_champion``), so ``rollback`` can restore the previous champion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from serving.model_store import get_alias_version, set_alias

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
HISTORY_TAG = "champion_history"


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: from ``previous`` (None if unset) to ``version``."""

    alias: str
    version: str
    previous: str | None


def _history(client: MlflowClient, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    raw = tags.get(HISTORY_TAG, "")
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


def promote(client: MlflowClient, name: str, version: str | int, reason: str = "manual") -> AliasMove:
    """Make ``version`` the champion and record the previous champion for rollback.

    Raises:
        mlflow.exceptions.MlflowException: the version does not exist.
    """
    version = str(version)
    client.get_model_version(name, version)  # raises if absent
    previous = get_alias_version(client, name, CHAMPION)
    if previous == version:
        logger.info("already champion model=%s version=%s", name, version)
        return AliasMove(CHAMPION, version, previous)
    set_alias(client, name, CHAMPION, version)
    history = _history(client, name)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)
    history.append(version)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    client.set_model_version_tag(name, version, "previous_champion", previous or "none")
    client.set_model_version_tag(name, version, "promoted_by", reason)
    if get_alias_version(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    logger.info("promoted model=%s version=%s previous=%s reason=%s", name, version, previous, reason)
    return AliasMove(CHAMPION, version, previous)


def rollback(client: MlflowClient, name: str) -> AliasMove:
    """Move ``champion`` back to the champion before the current one.

    The current champion is taken from the alias (so a UI promotion is respected); the target is
    the last different version in ``champion_history`` before it, else the current version's
    ``previous_champion`` tag.

    Raises:
        LookupError: there is no champion, or no earlier champion to return to.
    """
    current = get_alias_version(client, name, CHAMPION)
    if current is None:
        raise LookupError(f"registered model {name!r} has no {CHAMPION!r} alias to roll back")
    history = _history(client, name)
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
    set_alias(client, name, CHAMPION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    client.set_model_version_tag(name, current, "rolled_back", f"to {target}")
    client.set_model_version_tag(name, target, "restored_from", current)
    logger.info("rolled back model=%s from=%s to=%s", name, current, target)
    return AliasMove(CHAMPION, target, current)


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
