"""The model registry: versions, the ``challenger`` and ``champion`` aliases, promotion and rollback.

Everything downstream (serving, the loop) follows one alias, ``settings.model_alias`` (``champion``
by default; every caller passes it, nothing here assumes its name), so moving it in the MLflow UI is a
complete promotion. The history of champions is kept as a registered-model tag
(``champion_history``: comma-separated versions, oldest first) and on each version
(``previous_champion``), so ``rollback`` can restore the previous champion.

Promotion is checked (``promote_checked``, behind ``recloop model promote``): a version whose gate
failed (``gate.decision=fail``) or that does not load and smoke-score in a fresh process
(``check_loads``) is refused unless forced, and a forced promotion is recorded on the version
(``forced=true``, ``promoted_by=<reason> --force``, ``forced_over``). The last version known to load
under an alias is a registered-model tag, ``last_good_version.<alias>``, written by a checked
promotion and by the service after it loaded and smoke-scored the alias's version; a service whose
alias points at a version that does not load falls back to it (``fallback_candidates``), so every
replica agrees on what to serve.

Forgotten users (``recloop.forget``): when a deletion completes, every existing version is tagged
``recloop.holds_forgotten_users=true`` (``tag_holding_forgotten``: it was trained while the user's data was
in its training set). A checked promotion of such a version, and a rollback to one, are refused unless
forced (``force=True``, recorded as ``forced_over``/``restored_over``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from recloop.forget import HOLDS_FORGOTTEN_TAG

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"  # per served alias: "<alias>_history" unless the alias is "champion"
LAST_GOOD_TAG = "last_good_version"  # registered-model tag "last_good_version.<alias>"
LOAD_CHECK_TIMEOUT_S = 120.0
MAX_FALLBACKS = 5  # versions a starting service tries after the alias's (each load takes seconds)
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_LOAD_CHECK_ERROR = "RECLOOP_LOAD_CHECK_ERROR:"
_LOAD_CHECK_OK = "RECLOOP_LOAD_CHECK_OK"


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


def holds_forgotten(client: MlflowClient, name: str, version: str | int) -> bool:
    """Whether ``version`` was trained before a user's deletion completed (tagged ``HOLDS_FORGOTTEN_TAG``)."""
    return client.get_model_version(name, str(version)).tags.get(HOLDS_FORGOTTEN_TAG) == "true"


def tag_holding_forgotten(client: MlflowClient, name: str) -> int:
    """Tag every registered version of ``name`` as holding forgotten users (a deletion just completed:
    each was trained while the user's data was in its training set). Returns the versions newly tagged
    (0 when the model is not registered)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return 0
    n = 0
    for mv in versions:
        if (mv.tags or {}).get(HOLDS_FORGOTTEN_TAG) != "true":
            client.set_model_version_tag(name, mv.version, HOLDS_FORGOTTEN_TAG, "true")
            n += 1
    return n


def rollback(client: MlflowClient, name: str, *, alias: str, force: bool = False) -> AliasMove:
    """Move the served ``alias`` (``settings.model_alias``) back to the version it pointed at before.

    The current champion is taken from the alias (so a UI promotion is respected); the target is
    the last different version in ``champion_history`` before it, else the current version's
    ``previous_champion`` tag.

    A target tagged ``HOLDS_FORGOTTEN_TAG`` (trained before a user was forgotten) is refused unless
    ``force`` (the target is then tagged ``restored_over``).

    Raises:
        LookupError: there is no champion, or no earlier champion to return to.
        PromotionRefused: the target holds forgotten users and ``force`` is False (the alias did not move).
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
    if holds_forgotten(client, name, target):
        reason = f"version {target} was trained before a user was forgotten ({HOLDS_FORGOTTEN_TAG}=true)"
        if not force:
            raise PromotionRefused(name, target, alias, [reason])
        client.set_model_version_tag(name, target, "restored_over", reason)
    set_alias(client, name, alias, target)
    client.set_registered_model_tag(name, _history_tag(alias), ",".join(history))
    client.set_model_version_tag(name, current, "rolled_back", f"to {target}")
    client.set_model_version_tag(name, target, "restored_from", current)
    logger.info("rolled back model=%s alias=%s from=%s to=%s", name, alias, current, target)
    return AliasMove(alias, target, current)


def last_good_tag(alias: str) -> str:
    """The registered-model tag holding the last version known to load under ``alias``."""
    return f"{LAST_GOOD_TAG}.{alias}"


def get_last_good(client: MlflowClient, name: str, alias: str) -> str | None:
    """The ``last_good_version.<alias>`` tag of ``name``, or None (unset, or no such model)."""
    try:
        return client.get_registered_model(name).tags.get(last_good_tag(alias)) or None
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def record_last_good(client: MlflowClient, name: str, alias: str, version: str | int) -> bool:
    """Record ``version`` as the last version that loaded under ``alias``; True when the tag changed.

    Written after a fresh-process load check (``promote_checked``) and by the service after it loaded
    and smoke-scored the alias's version; replicas writing the same value is harmless.
    """
    version = str(version)
    if get_last_good(client, name, alias) == version:
        return False
    client.set_registered_model_tag(name, last_good_tag(alias), version)
    logger.info("last good version model=%s alias=%s version=%s", name, alias, version)
    return True


def fallback_candidates(client: MlflowClient, name: str, alias: str, exclude: Iterable[str | None] = ()
                        ) -> list[str]:
    """Versions to serve when the alias's version does not load, best first (at most ``MAX_FALLBACKS``).

    The ``last_good_version.<alias>`` tag first, then the alias's earlier champions (its history,
    newest first), without ``exclude`` (e.g. the version that just failed). Empty when the model
    does not exist.
    """
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    skip = {str(v) for v in exclude if v is not None}
    ordered = [tags.get(last_good_tag(alias), ""), *reversed(tags.get(_history_tag(alias), "").split(","))]
    out: list[str] = []
    for version in ordered:
        if version and version not in skip and version not in out:
            out.append(version)
    return out[:MAX_FALLBACKS]


@dataclass(frozen=True)
class LoadCheck:
    """The outcome of loading and smoke-scoring one version in a fresh process (``check_loads``)."""

    version: str
    ok: bool
    error: str | None = None  # the subprocess's last error line when not ok
    seconds: float = 0.0


# Run by ``check_loads`` as ``python -c``: argv = tracking URI, model name, version. The same load path
# as the service (registry.store.load_version) and the same smoke test (one short history, every
# item scored, finite). The last stderr line is the error when anything fails.
_LOAD_CHECK_CODE = f"""
import sys
uri, name, version = sys.argv[1:4]
try:
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    from models.ranking import score_histories
    from registry.store import load_version

    loaded = load_version(name, version=version, client=MlflowClient(tracking_uri=uri, registry_uri=uri))
    n = len(loaded.vocab)
    scores = score_histories(loaded.model, [np.arange(1, min(n, 3) + 1, dtype=np.int64)])
    if scores.shape != (1, n + 1) or not np.isfinite(scores[:, 1:]).all():
        raise ValueError(f"smoke score failed: shape {{scores.shape}}, expected (1, {{n + 1}}) and finite")
except Exception as err:
    message = " ".join(f"{{type(err).__name__}}: {{err}}".split())[:1000]
    print({_LOAD_CHECK_ERROR!r}, message, file=sys.stderr, flush=True)
    sys.exit(1)
print({_LOAD_CHECK_OK!r}, loaded.version, n, flush=True)
"""


def _last_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    marked = [line for line in lines if line.startswith(_LOAD_CHECK_ERROR)]
    if marked:
        return marked[-1].removeprefix(_LOAD_CHECK_ERROR).strip()
    if lines:
        return lines[-1][:1000]
    if proc.returncode < 0:
        return f"load check killed by signal {-proc.returncode}"
    return f"load check exited with code {proc.returncode}"


def check_loads(tracking_uri: str, name: str, version: str | int, *,
                timeout_s: float = LOAD_CHECK_TIMEOUT_S) -> LoadCheck:
    """Load ``models:/<name>/<version>`` in a fresh Python process and smoke-score one history.

    The child gets this interpreter, this environment (MLflow credentials included) plus the
    telemetry opt-outs, and nothing loaded in this process, so a version that only loads here
    (a module imported earlier, a cached artifact) is caught.

    Returns:
        ``LoadCheck``: ok, or the child's last error line (a timeout after ``timeout_s`` is an error).
    """
    from recloop.settings import TELEMETRY_ENV

    env = {**TELEMETRY_ENV, **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-c", _LOAD_CHECK_CODE, tracking_uri, name, str(version)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return LoadCheck(str(version), False, f"load check timed out after {timeout_s:g} s", timeout_s)
    seconds = round(time.monotonic() - t0, 2)
    if proc.returncode == 0 and _LOAD_CHECK_OK in proc.stdout:
        logger.info("load check passed model=%s version=%s seconds=%s", name, version, seconds)
        return LoadCheck(str(version), True, None, seconds)
    error = _last_error_line(proc)
    logger.warning("load check failed model=%s version=%s error=%s", name, version, error)
    return LoadCheck(str(version), False, error, seconds)


class PromotionRefused(Exception):
    """A checked promotion found reasons not to serve the version (``reasons``); nothing was moved."""

    def __init__(self, name: str, version: str, alias: str, reasons: list[str]) -> None:
        self.name, self.version, self.alias, self.reasons = name, version, alias, list(reasons)
        super().__init__(f"version {version} of {name!r} not promoted to {alias!r}: " + "; ".join(reasons))


def promote_checked(client: MlflowClient, name: str, version: str | int, *, alias: str, tracking_uri: str,
                    force: bool = False, reason: str = "manual", timeout_s: float = LOAD_CHECK_TIMEOUT_S,
                    load_check: Callable[..., LoadCheck] = check_loads) -> AliasMove:
    """``promote`` after checking the version: refused when its gate failed or it does not load.

    1. A version tagged ``gate.decision=fail``, or ``recloop.holds_forgotten_users=true`` (trained before a
       user was forgotten), is refused (without running the load check).
    2. ``load_check`` (``check_loads``: a fresh process loads and smoke-scores it, ``timeout_s``);
       the outcome is tagged on the version (``load_check``: ``pass`` | ``fail: <error>``).
    3. With ``force`` the version is promoted anyway, and the version is tagged ``forced=true``,
       ``forced_over=<the reasons>`` and ``promoted_by=<reason> --force`` (``forced=false`` otherwise).
    4. When the load check passed, ``last_good_version.<alias>`` becomes this version.

    A version the alias already points at is left alone (no check).

    Raises:
        PromotionRefused: a check failed and ``force`` is False (the alias did not move).
        mlflow.exceptions.MlflowException: the version does not exist.
    """
    version = str(version)
    mv = client.get_model_version(name, version)  # raises if absent
    previous = get_alias_version(client, name, alias)
    if previous == version:
        logger.info("already served model=%s alias=%s version=%s", name, alias, version)
        return AliasMove(alias, version, previous)
    blockers: list[str] = []
    if mv.tags.get(HOLDS_FORGOTTEN_TAG) == "true":
        blockers.append(f"version {version} was trained before a user was forgotten ({HOLDS_FORGOTTEN_TAG}=true)")
        if not force:
            raise PromotionRefused(name, version, alias, blockers)
    if mv.tags.get("gate.decision") == "fail":
        why = mv.tags.get("gate.reasons", "")
        blockers.append(f"version {version} failed the evaluation gate (gate.decision=fail"
                        + (f": {why[:300]})" if why else ")"))
        if not force:
            raise PromotionRefused(name, version, alias, blockers)
    check = load_check(tracking_uri, name, version, timeout_s=timeout_s)
    client.set_model_version_tag(name, version, "load_check", "pass" if check.ok else f"fail: {check.error}"[:4900])
    if not check.ok:
        blockers.append(f"version {version} does not load in a fresh process: {check.error}")
    if blockers and not force:
        raise PromotionRefused(name, version, alias, blockers)
    move = promote(client, name, version, alias=alias, reason=f"{reason} --force" if force else reason)
    client.set_model_version_tag(name, version, "forced", "true" if force else "false")
    if force:
        client.set_model_version_tag(name, version, "forced_over", "; ".join(blockers)[:4900] or "none")
        logger.warning("forced promotion model=%s alias=%s version=%s over=%s", name, alias, version,
                       blockers or "nothing")
    if check.ok:
        record_last_good(client, name, alias, version)
    return move


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
