"""`recloop up`, `recloop down` and `recloop demo`: the local platform on loopback.

``up`` starts the Prefect server, the MLflow UI, the BentoML recommender and the deployment runner
(PID files and logs under ``<home>/run/``) and prints the UI addresses. ``demo`` brings the platform
up, runs the pipeline on the embedded synthetic data (or ``--source/--path``), then shows a user's
recommendations, sends feedback through the endpoint and shows the changed recommendations.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from recloop.settings import Settings, get_settings
from supervisor import services

console = Console()


def point_prefect_at_server(settings: Settings) -> None:
    """Make this process's Prefect client use the local server (call before importing flows)."""
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    os.environ["PREFECT_HOME"] = str(settings.home / "prefect")


def up(settings: Settings, names: tuple[str, ...] = services.SERVICE_ORDER, wait: bool = True) -> dict[str, int]:
    """Start ``names`` (all spawned at once, then awaited in order). Returns name → PID.

    Raises:
        RuntimeError: a service did not become healthy (its log file is named).
    """
    if "serving" in names and not has_champion(settings):
        console.print("serving: no champion yet — run `recloop pipeline` (or `recloop demo`) first; skipped")
        names = tuple(n for n in names if n != "serving")
    pids = {name: services.spawn(settings, name) for name in names}
    if wait:
        for name in names:
            pids[name] = services.wait_healthy(settings, name)
    return pids


def has_champion(settings: Settings) -> bool:
    """Whether the registry has a version under the serving alias."""
    from registry.aliases import get_alias_version
    from registry.tracking import configure_tracking

    return get_alias_version(configure_tracking(settings), settings.model_name, settings.model_alias) is not None


def down(settings: Settings) -> list[str]:
    """Stop every service (reverse start order). Returns the names that were running."""
    return [name for name in reversed(services.SERVICE_ORDER) if services.stop(settings, name)]


def print_urls(settings: Settings) -> None:
    """Print the UI and endpoint addresses."""
    for name, url in services.urls(settings).items():
        console.print(f"  {name:<12} {url}")


def _post(settings: Settings, path: str, body: dict[str, Any]) -> dict[str, Any]:
    base = services.urls(settings)["recommender"]
    headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
    resp = httpx.post(f"{base}/{path}", json=body, headers=headers, timeout=30.0)
    resp.raise_for_status()
    return resp.json()


def show_recommendations(title: str, body: dict[str, Any], highlight: str | None = None) -> None:
    """Render a /recommend answer as a table."""
    table = Table(title=f"{title} (model v{body.get('model_version')}, variant {body.get('variant')}, "
                        f"cold_start={body.get('cold_start')})")
    table.add_column("#", justify="right")
    table.add_column("item_id")
    table.add_column("title")
    table.add_column("score", justify="right")
    for rank, item in enumerate(body["items"], start=1):
        mark = " ◀" if item["item_id"] == highlight else ""
        table.add_row(str(rank), item["item_id"] + mark, str(item.get("title") or "")[:48], f"{item['score']:.3f}")
    console.print(table)


def interact(settings: Settings, user_id: str, k: int = 10) -> dict[str, Any]:
    """Recommend → click the top item → recommend again; returns both answers and the clicked item."""
    before = _post(settings, "recommend", {"user_id": user_id, "k": k})
    show_recommendations(f"recommendations for user {user_id}", before)
    clicked = before["items"][0]["item_id"]
    ack = _post(settings, "feedback", {"user_id": user_id, "item_id": clicked, "event_type": "click"})
    console.print(f"feedback: user {user_id} clicked item {clicked} → {ack}")
    after = _post(settings, "recommend", {"user_id": user_id, "k": k})
    show_recommendations(f"recommendations for user {user_id} right after the click", after)
    changed = [it["item_id"] for it in before["items"]] != [it["item_id"] for it in after["items"]]
    console.print(f"clicked item excluded now: {clicked not in {it['item_id'] for it in after['items']}}; "
                  f"list changed: {changed}")
    return {"before": before, "after": after, "clicked": clicked, "changed": changed}


def demo(source: str = "synthetic", path: str | None = None, epochs: int | None = None,
         user_id: str | None = None) -> dict[str, Any]:
    """The main job: platform up, pipeline on ``source``, a served model answering, feedback loop shown."""
    settings = get_settings()
    point_prefect_at_server(settings)
    t0 = time.monotonic()
    console.rule("recloop demo")
    console.print(f"home: {settings.home}")
    up(settings, ("prefect", "mlflow"))  # serving starts in the deploy stage, once a champion exists
    console.print(f"platform up in {time.monotonic() - t0:.0f} s")

    from flows.pipeline import pipeline_flow  # after PREFECT_API_URL points at our server
    from recloop.lake import Lake

    held = Lake(settings.lake_path).watermarks()
    others = sorted(set(held) - {source})
    if others:
        console.print(f"[yellow]note: the lake in {settings.home} also holds sources {others}; training uses the "
                      f"whole lake. Use a fresh RECLOOP_HOME (or `make clean`) to train on {source!r} alone.[/]")

    # A bounded training budget keeps the demo within a few minutes on 2 cores.
    train_params = {"epochs": epochs or 20, "max_train_seconds": 90.0}
    stages = pipeline_flow(source=source, path=path, train_params=train_params, deploy=True, start_service=True)
    evaluation = stages["evaluate"]
    console.print(evaluation.get("report_md", ""), soft_wrap=True, markup=False)
    console.print(f"gate passed={evaluation['passed']} promoted={evaluation['promoted']} "
                  f"version={evaluation['version']}; deployed={stages['deploy'] and stages['deploy']['version']}")
    up(settings, ("runner",))
    events = Lake(settings.lake_path).events()
    user = user_id or str(events["user_id"].iloc[-1])
    result = interact(settings, user)
    console.rule(f"done in {time.monotonic() - t0:.0f} s — the platform keeps running (`recloop down` stops it)")
    print_urls(settings)
    return {"stages": stages, "interaction": result, "wall_s": time.monotonic() - t0}
