"""`recloop up`, `recloop down` and `recloop demo`: the local platform on loopback.

``up`` starts the Prefect server, the MLflow UI, the BentoML recommender and the deployment runner
(PID files and logs under ``<home>/run/``) and prints the UI addresses. ``demo`` brings the platform
up, runs the pipeline on the embedded synthetic data (or ``--source/--path``), then shows a user's
recommendations, sends feedback through the endpoint and shows the changed recommendations. When
the evaluation gate holds the first model back there is nothing to serve: ``demo`` raises
``NoChampionError`` with the gate's reasons (the CLI prints them and exits 3).
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from cli import DEMO_TRAIN_SECONDS
from recloop.settings import Settings, get_settings
from supervisor import services

console = Console()


def point_prefect_at_server(settings: Settings) -> None:
    """Make this process's Prefect client use the local server (call before importing flows)."""
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    os.environ["PREFECT_HOME"] = str(settings.home / "prefect")


def migrate_event_log(settings: Settings) -> str:
    """Bring the event-log database (events, exposures) to the code's schema before anything starts
    (``recloop.logdb.upgrade``: Alembic, idempotent, safe against concurrent starts). Returns the revision."""
    from recloop.logdb import make_engine, upgrade

    engine = make_engine(settings.event_log_uri)
    try:
        revision = upgrade(engine)
    finally:
        engine.dispose()
    console.print(f"event log schema at revision {revision}")
    return revision


def up(settings: Settings, names: tuple[str, ...] = services.SERVICE_ORDER, wait: bool = True) -> dict[str, int]:
    """Start ``names`` (all spawned at once, then awaited in order). Returns name → PID.

    Before anything is spawned, every service that is not running yet must find its port free: a
    port held by another process (an orphan of an earlier run, or a foreign server) stops ``up`` with
    nothing started. Each service counts as up only when the process answering its health URL is
    the one started (or a child of it).

    Args:
        settings: home and ports.
        names: the services to start (``serving`` is skipped while the registry has no champion).
        wait: wait until each is healthy.
    Returns:
        Service name → PID.
    Raises:
        ValueError: an unknown service name.
        services.PortInUseError: a port is taken (the message names the holder's pid and command).
        RuntimeError: a service did not become healthy (its log file is named).
    """
    migrate_event_log(settings)
    if "serving" in names and not has_champion(settings):
        console.print("serving: no champion yet — run `recloop pipeline` (or `recloop demo`) first; skipped")
        names = tuple(n for n in names if n != "serving")
    for name in names:
        if services.running_pid(settings, name) is None:
            services.check_port(settings, name)
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
    """Stop every service (reverse start order): each one's process tree, group and orphans under this home.

    Returns:
        The names of the services that had processes to stop.
    """
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
    table.add_column("because")
    for rank, item in enumerate(body["items"], start=1):
        mark = " ◀" if item["item_id"] == highlight else ""
        table.add_row(str(rank), item["item_id"] + mark, str(item.get("title") or "")[:48], f"{item['score']:.3f}",
                      because_text(item))
    console.print(table)


def because_text(item: dict[str, Any]) -> str:
    """The explanation column of one recommended item: its reason and the weights of its history items."""
    because = item.get("because") or []
    if not because:
        return ""
    weights = ", ".join(f"{str(b.get('title') or b['item_id'])[:24]} {b['weight']:.2f}" for b in because)
    return f"{str(item.get('reason') or '')[:60]} ({weights})"


def interact(settings: Settings, user_id: str, k: int = 10) -> dict[str, Any]:
    """Recommend → click the top item → recommend again; returns both answers and the clicked item."""
    before = _post(settings, "recommend", {"user_id": user_id, "k": k, "explain": True})
    show_recommendations(f"recommendations for user {user_id}", before)
    clicked = before["items"][0]["item_id"]
    ack = _post(settings, "feedback", {"user_id": user_id, "item_id": clicked, "event_type": "click"})
    console.print(f"feedback: user {user_id} clicked item {clicked} → {ack}")
    after = _post(settings, "recommend", {"user_id": user_id, "k": k, "explain": True})
    show_recommendations(f"recommendations for user {user_id} right after the click", after)
    changed = [it["item_id"] for it in before["items"]] != [it["item_id"] for it in after["items"]]
    console.print(f"clicked item excluded now: {clicked not in {it['item_id'] for it in after['items']}}; "
                  f"list changed: {changed}")
    steered = None
    try:  # a text query steers the next answer (serving/catalog.py); the first one loads the encoder
        steered = _post(settings, "recommend", {"user_id": user_id, "k": k, "query": DEMO_QUERY})
        show_recommendations(f"recommendations for user {user_id} with the query {DEMO_QUERY!r}", steered)
    except httpx.HTTPError as err:
        console.print(f"query not shown: {err}")
    return {"before": before, "after": after, "clicked": clicked, "changed": changed, "query": steered}


#: The text query the demo sends once (``recommend``'s ``query``).
DEMO_QUERY = "space adventure with robots"


class NoChampionError(RuntimeError):
    """The demo's pipeline ended with no model to serve: the gate held the candidate back (or promotion is off).

    Attributes:
        version: the candidate's registered version.
        passed: the gate's verdict on it.
        reasons: the gate's reasons, one line per rule (``PASS ...`` / ``FAIL ...``).
    """

    def __init__(self, message: str, *, version: str | None, passed: bool, reasons: list[str]) -> None:
        super().__init__(message)
        self.version = version
        self.passed = passed
        self.reasons = reasons


def held_back_message(evaluation: dict[str, Any], alias: str) -> str:
    """Why there is no model to serve after an evaluation that promoted nothing (pure).

    Args:
        evaluation: the evaluate flow's result (``version``, ``passed``, ``decision.reasons``).
        alias: the served alias (``settings.model_alias``).
    Returns:
        A multi-line message: the verdict, the gate's reasons, what to do next.
    """
    version = evaluation.get("version")
    reasons = list((evaluation.get("decision") or {}).get("reasons") or [])
    if evaluation.get("passed"):
        head = (f"the gate passed candidate version {version}, but auto-promotion is off (RECLOOP_AUTO_PROMOTE), "
                f"so no version holds the {alias!r} alias and there is no model to serve; "
                f"`recloop model promote {version}` serves it.")
    else:
        head = (f"the gate held the model back: candidate version {version} is registered but was not promoted to "
                f"{alias!r}, and no earlier version holds it, so there is no model to serve.")
    lines = [head, "Gate reasons:", *(f"  - {r}" for r in reasons or ["(none reported)"])]
    if not evaluation.get("passed"):
        lines.append("Train longer (`recloop demo --epochs N --max-train-seconds S`) or on a quieter machine.")
    lines.append("Prefect, MLflow and the loop runner keep running (`recloop down` stops them).")
    return "\n".join(lines)


def demo(source: str = "synthetic", path: str | None = None, epochs: int | None = None,
         user_id: str | None = None, max_train_seconds: float = DEMO_TRAIN_SECONDS) -> dict[str, Any]:
    """The main job: platform up, pipeline on ``source``, a served model answering, feedback loop shown.

    Args:
        source / path: the data source and its file or folder (synthetic needs no path).
        epochs: training epochs (default 20).
        user_id: the user whose recommendations are shown (default the lake's last user).
        max_train_seconds: the training's wall-clock budget.
    Returns:
        ``{"stages", "interaction", "wall_s"}``.
    Raises:
        NoChampionError: the gate held the candidate back and no earlier champion exists, so nothing
            serves (Prefect, MLflow and the runner stay up); the message holds the gate's reasons.
        services.PortInUseError: a service's port is held by another process.
        RuntimeError: a service did not become healthy.
        httpx.HTTPError: the recommender did not answer the interaction.
    """
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
    train_params = {"epochs": epochs or 20, "max_train_seconds": max_train_seconds}
    stages = pipeline_flow(source=source, path=path, train_params=train_params, deploy=True, start_service=True)
    evaluation = stages["evaluate"]
    console.print(evaluation.get("report_md", ""), soft_wrap=True, markup=False)
    console.print(f"gate passed={evaluation['passed']} promoted={evaluation['promoted']} "
                  f"version={evaluation['version']}; deployed={stages['deploy'] and stages['deploy']['version']}")
    up(settings, ("runner",))
    if stages["deploy"] is None:
        reasons = list((evaluation.get("decision") or {}).get("reasons") or [])
        raise NoChampionError(held_back_message(evaluation, settings.model_alias), version=evaluation.get("version"),
                              passed=bool(evaluation.get("passed")), reasons=reasons)
    if not evaluation["promoted"]:
        console.print(f"[yellow]the gate held candidate version {evaluation['version']} back; the previous "
                      f"{settings.model_alias!r} version {stages['deploy']['version']} keeps serving.[/]")
    events = Lake(settings.lake_path).events()
    user = user_id or str(events["user_id"].iloc[-1])
    result = interact(settings, user)
    console.rule(f"done in {time.monotonic() - t0:.0f} s — the platform keeps running (`recloop down` stops it)")
    print_urls(settings)
    return {"stages": stages, "interaction": result, "wall_s": time.monotonic() - t0}
