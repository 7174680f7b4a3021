"""Deploy stage: make the running BentoML service serve the champion, then smoke-test it.

The service follows the MLflow alias by itself (a daemon thread polls it and hot-swaps a new
version after loading and smoke-scoring it), so deploying a promoted version means: make sure the
service runs, wait until ``/model_info`` reports the champion's version, and call ``/recommend``.
If the service does not take the new version in time (or the smoke call fails), the alias is
moved back to the previous champion, the old version keeps serving, and the flow run fails.
Optionally the flow also builds a Bento pinned to the version (``bentoml build``, offline).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from recloop.settings import Settings, get_settings


class DeployError(RuntimeError):
    """The service did not serve the expected version, or its smoke request failed."""


def service_url(settings: Settings) -> str:
    """Base URL of the recommender service."""
    return f"http://{settings.serve_host}:{settings.serve_port}"


def _headers(settings: Settings) -> dict[str, str]:
    return {"X-API-Key": settings.api_key} if settings.api_key else {}


def served_version(base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 5.0) -> str | None:
    """The model version the service at ``base_url`` reports, or None if it does not answer.

    Raises:
        nothing: transport errors map to None (the caller is polling).
    """
    try:
        resp = httpx.post(f"{base_url}/model_info", json={}, headers=headers or {}, timeout=timeout_s)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    version = resp.json().get("version")
    return None if version is None else str(version)


def wait_for_version(base_url: str, version: str, timeout_s: float, headers: dict[str, str] | None = None,
                     poll_s: float = 1.0) -> float:
    """Poll ``/model_info`` until the service reports ``version``.

    Returns:
        Seconds waited.
    Raises:
        DeployError: not served within ``timeout_s`` (the message gives the version last seen).
    """
    poll = Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(poll_s),
                    retry=retry_if_result(lambda seen: seen != version))
    start = time.monotonic()
    try:
        poll(served_version, base_url, headers)
    except RetryError as err:
        seen = err.last_attempt.result()
        raise DeployError(
            f"service at {base_url} serves version {seen!r}, expected {version!r} after {timeout_s:.0f} s"
        ) from None
    return time.monotonic() - start


def smoke_test(base_url: str, user_id: str, k: int = 10, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One ``/recommend`` call; checks k distinct items come back.

    Raises:
        DeployError: non-200 answer or fewer/duplicate items.
    """
    resp = httpx.post(f"{base_url}/recommend", json={"user_id": user_id, "k": k}, headers=headers or {},
                      timeout=10.0)
    if resp.status_code != 200:
        raise DeployError(f"smoke /recommend answered {resp.status_code}: {resp.text[:300]}")
    body = resp.json()
    ids = [it["item_id"] for it in body.get("items", [])]
    if len(ids) != k or len(set(ids)) != k:
        raise DeployError(f"smoke /recommend returned {len(set(ids))} distinct items, expected {k}")
    return body


@task(retries=2, retry_delay_seconds=[2, 10])
def ensure_service_task(start_if_down: bool) -> str:
    """Make sure the recommender answers; start it (``recloop up`` style) when allowed."""
    from supervisor import services

    settings = get_settings()
    url = service_url(settings)
    if served_version(url, _headers(settings)) is None and start_if_down:
        get_run_logger().info("service not answering; starting it url=%s", url)
        services.start(settings, "serving")
    return url


@task
def build_bento_task(version: str) -> str:
    """Build a Bento pinned to ``version`` (offline recipe of serving/bento_build.py)."""
    from serving.bento_build import build

    return build(version=version)


@flow(name="deploy")
def deploy_flow(version: str | None = None, smoke_user: str | None = None, start_if_down: bool = True,
                timeout_s: float = 120.0, build_bento: bool = False) -> dict[str, Any]:
    """Serve the champion (or ``version``) from the running service and smoke-test it.

    Args:
        version: the model version expected to serve; default the current ``champion`` alias.
        smoke_user: user id for the smoke ``/recommend`` (any id works: unknown users are cold starts).
        start_if_down: start the service if it does not answer.
        timeout_s: how long the service may take to swap in the version (seconds).
        build_bento: also build a Bento pinned to the version.
    Returns:
        ``{"version", "url", "swap_wait_s", "smoke_items", "bento"}``.
    Raises:
        DeployError: the version was not served or the smoke test failed; the alias was rolled back.
    """
    from registry.aliases import get_alias_version, rollback
    from registry.tracking import configure_tracking

    logger = get_run_logger()
    settings = get_settings()
    client = configure_tracking(settings)
    version = version or get_alias_version(client, settings.model_name, settings.model_alias)
    if not version:
        raise DeployError(f"no {settings.model_alias!r} alias on model {settings.model_name!r}: nothing to deploy")
    url = ensure_service_task(start_if_down)
    headers = _headers(settings)
    try:
        waited = wait_for_version(url, version, timeout_s, headers)
        body = smoke_test(url, smoke_user or "smoke-test-user", headers=headers)
    except DeployError:
        logger.error("deploy failed version=%s; rolling the alias back", version)
        if get_alias_version(client, settings.model_name, settings.model_alias) == version:
            rollback(client, settings.model_name, alias=settings.model_alias)
        raise
    bento = build_bento_task(version) if build_bento else None
    logger.info("deployed version=%s url=%s swap_wait_s=%.1f", version, url, waited)
    create_markdown_artifact(
        key="recloop-deploy",
        markdown=f"### Deploy\n\n| version | url | swap wait (s) | smoke items |\n|---|---|---|---|\n"
        f"| {version} | {url} | {waited:.1f} | {len(body['items'])} |\n",
        description="What the recommender serves after this run",
    )
    return {"version": version, "url": url, "swap_wait_s": waited, "smoke_items": len(body["items"]), "bento": bento}
