"""Simulated users against the real HTTP service, with the real loop between rounds (``recloop simulate``).

``simulate`` brings up a scratch platform by default (its own temp home and free ports, never the
user's live one): the Prefect server, the pipeline on ``source`` (ingest, validate, features, train,
gate, register) and the BentoML service serving the champion, the way ``recloop demo`` does. Then,
round by round, every sampled user (the dataset's users, their lake histories as starting histories)
runs ``sessions_per_round`` sessions of ``models.simulator.UserSimulator`` over HTTP (``HttpDriver``:
``/recommend``, then ``/feedback`` for each click and skip, linked by ``request_id`` and ``position``).
Between rounds the real ``loop_flow`` runs (new feedback → validate → lake → features → warm retrain →
gate → register → deploy) and the round after waits until the service serves the new champion (or
notes that the gate held it back). With ``target_url`` a running service is driven instead and
nothing is started (no loop unless asked).

Each round records CTR@k, clicks and slates per session, skip rate, catalogue share, novelty
(``round_metrics``), the served model version(s), errors, wall time and sessions/s. The whole run is
one MLflow run in experiment ``recloop-simulation`` (rounds as steps, a CTR-over-rounds plot); in the
scratch case it lives in the scratch home's MLflow store, which is kept on disk (``home`` in the result).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from recloop.settings import Settings, get_settings

if TYPE_CHECKING:
    from models.simulator import Reaction, SessionResult

SIMULATION_EXPERIMENT = "recloop-simulation"
#: Transport failures that are retried (the request never reached the service, or the kept-alive
#: connection was closed under it). A timeout or a non-2xx answer is never retried: it is an error.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout,
                                                  httpx.RemoteProtocolError)
#: Training budget of the scratch platform's first model (as ``recloop demo``).
FIRST_TRAIN_PARAMS: dict[str, Any] = {"epochs": 20, "max_train_seconds": 90.0}
#: What the simulated user's reactions are sent as (the event policy decides what they mean).
REACTION_EVENTS = {"click": "click", "skip": "skip", "ignore": None}


def _say(message: str) -> None:
    """Progress on stderr (stdout stays free for ``--json``)."""
    print(f"[simulate] {message}", file=sys.stderr, flush=True)


class ServiceError(RuntimeError):
    """The service answered a non-2xx status, or could not be reached after the retries."""


class HttpDriver:
    """The simulator's ``recommend`` and ``feedback`` callables over the service's HTTP API.

    One keep-alive ``httpx.Client``; connection errors are retried (tenacity, ``retries`` attempts with
    backoff), nothing else is. Every failure is counted in ``errors`` (with a sample in ``error_log``):
    a failed ``recommend`` raises ``ServiceError`` (there is no slate to react to), a failed ``feedback``
    is counted and the session goes on (the reaction happened; only its report was lost).

    Feedback carries a deterministic ``event_id`` (``sim-<request_id>-<position>``), so a retried
    request is stored once (the service's idempotency by ``event_id``).

    Attributes:
        errors: failed requests (non-2xx answers and transport failures after the retries).
        recommends / feedbacks: successful requests.
        acknowledged: one dict per acknowledged feedback (event_id, request_id, position, item_id,
            event_type, inserted, role).
        versions: served model version → recommends answered by it.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 4,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport,
                                   limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=30.0))
        self.retries = retries
        self.errors = 0
        self.error_log: list[str] = []
        self.recommends = 0
        self.feedbacks = 0
        self.acknowledged: list[dict[str, Any]] = []
        self.versions: Counter[str] = Counter()

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def __enter__(self) -> HttpDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset_counts(self) -> dict[str, Any]:
        """The counters since the last reset (errors, recommends, feedbacks, versions), then zero them."""
        out = {"errors": self.errors, "recommends": self.recommends, "feedbacks": self.feedbacks,
               "versions": dict(self.versions), "error_samples": self.error_log[:5]}
        self.errors, self.recommends, self.feedbacks = 0, 0, 0
        self.error_log, self.versions = [], Counter()
        return out

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on connection errors only; raises ServiceError (counted) on any failure."""
        retrying = Retrying(retry=retry_if_exception_type(CONNECTION_ERRORS), stop=stop_after_attempt(self.retries),
                            wait=wait_exponential(multiplier=0.2, max=2.0), reraise=True)
        try:
            resp = retrying(self.client.post, path, json=body)
        except httpx.HTTPError as err:
            self._fail(f"{path}: {type(err).__name__}: {err}")
            raise ServiceError(f"{path} failed: {err}") from err
        if not resp.is_success:
            self._fail(f"{path}: HTTP {resp.status_code}: {resp.text[:300]}")
            raise ServiceError(f"{path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def _fail(self, message: str) -> None:
        self.errors += 1
        if len(self.error_log) < 20:
            self.error_log.append(message)

    def recommend(self, user_id: str, k: int) -> tuple[list[str], str]:
        """``POST /recommend`` → (item ids best first, request_id).

        Raises:
            ServiceError: non-2xx answer or no connection after the retries (counted in ``errors``).
        """
        body = self._post("/recommend", {"user_id": user_id, "k": k})
        self.recommends += 1
        self.versions[str(body.get("model_version"))] += 1
        return [str(item["item_id"]) for item in body["items"]], str(body.get("request_id") or "")

    def feedback(self, user_id: str, reaction: Reaction, request_id: str) -> None:
        """``POST /feedback`` for a click or a skip, linked to the answer by ``request_id`` and ``position``.

        An ``ignore`` sends nothing (what was shown is in the exposure log). A failure is counted in
        ``errors`` and not raised.
        """
        event_type = REACTION_EVENTS.get(reaction.action)
        if event_type is None:
            return
        event_id = f"sim-{request_id}-{reaction.position}"
        body = {"user_id": user_id, "item_id": reaction.item_id, "event_type": event_type, "event_id": event_id,
                "request_id": request_id, "position": int(reaction.position)}
        try:
            ack = self._post("/feedback", body)
        except ServiceError:
            return
        self.feedbacks += 1
        self.acknowledged.append({"event_id": str(ack.get("event_id", event_id)), "request_id": request_id,
                                  "position": int(reaction.position), "item_id": reaction.item_id,
                                  "event_type": event_type, "inserted": ack.get("inserted"),
                                  "role": ack.get("role")})


def round_metrics(results: Sequence[SessionResult], k: int, n_catalogue: int,
                  popularity: Mapping[str, float]) -> dict[str, Any]:
    """The online metrics of one round of simulated sessions. Pure.

    Args:
        results: the round's sessions.
        k: the slate length (CTR by position has k entries).
        n_catalogue: the number of items that could be shown.
        popularity: item id → interaction count (or share); shares are count / total. Items without
            a positive count are left out of the novelty mean (``novelty_slots`` says how many counted).
    Returns:
        ``sessions``, ``slots`` (items shown), ``clicks``, ``skips``, ``ctr_at_k`` (clicks / slots),
        ``clicks_per_session``, ``slates_per_session``, ``skip_rate`` (skips / slots),
        ``catalogue_share`` (distinct items shown / n_catalogue), ``novelty`` (mean −log2 of the
        shown items' popularity share, over slots), ``novelty_slots``, ``ctr_by_position`` (clicks at
        position p / slates that showed a position p). Rates are None with no slot shown.
    """
    n = len(results)
    slots = sum(len(slate) for r in results for slate in r.shown)
    clicks = sum(int(r.clicks) for r in results)
    skips = sum(int(r.skips) for r in results)
    slates = sum(int(r.slates) for r in results)
    distinct = {item for r in results for slate in r.shown for item in slate}
    total = float(sum(v for v in popularity.values() if v > 0))
    surprisal = [-math.log2(popularity[item] / total) for r in results for slate in r.shown for item in slate
                 if total > 0 and popularity.get(item, 0) > 0]
    shown_at = np.zeros(k, dtype=np.int64)
    clicked_at = np.zeros(k, dtype=np.int64)
    for r in results:
        for slate in r.shown:
            shown_at[: min(len(slate), k)] += 1
        clicked_at += np.asarray(r.clicks_by_position, dtype=np.int64)[:k]
    return {
        "sessions": n,
        "slots": slots,
        "clicks": clicks,
        "skips": skips,
        "ctr_at_k": clicks / slots if slots else None,
        "clicks_per_session": clicks / n if n else None,
        "slates_per_session": slates / n if n else None,
        "skip_rate": skips / slots if slots else None,
        "catalogue_share": len(distinct) / n_catalogue if n_catalogue else None,
        "novelty": float(np.mean(surprisal)) if surprisal else None,
        "novelty_slots": len(surprisal),
        "ctr_by_position": [float(c / s) if s else None for c, s in zip(clicked_at, shown_at, strict=True)],
    }


def rounds_markdown(result: Mapping[str, Any]) -> str:
    """The per-round table of a simulation result (pure)."""
    p = result["protocol"]
    lines = [f"## recloop simulation: {p['users']} users × {p['sessions_per_round']} sessions × {p['rounds']} rounds "
             f"({p['source']}, truth {p['truth']}, seed {p['seed']})", "",
             "| round | model version | CTR@k | clicks/session | slates/session | skip rate | catalogue share "
             "| novelty | errors | sessions/s | wall s | loop after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(value: Any, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    for r in result["rounds"]:
        after = r.get("loop") or {}
        loop = (f"{after.get('status')}: v{after.get('candidate_version')} "
                f"{'promoted' if after.get('promoted') else 'held back'}, {f(after.get('wall_s'), 1)} s"
                if after else "-")
        lines.append(f"| {r['round']} | {r['model_version']} | {f(r['ctr_at_k'])} | {f(r['clicks_per_session'], 2)} "
                     f"| {f(r['slates_per_session'], 2)} | {f(r['skip_rate'])} | {f(r['catalogue_share'])} "
                     f"| {f(r['novelty'], 2)} | {r['errors']} | {f(r['sessions_per_s'], 1)} | {f(r['wall_s'], 1)} "
                     f"| {loop} |")
    return "\n".join(lines)


# --- the scratch platform -------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scratch_environ(home: Path) -> dict[str, str]:
    """The ``RECLOOP_*`` and ``PREFECT_*`` variables of a scratch platform in ``home`` on free ports.

    Every store is named explicitly (SQLite under ``home``, the local profile, the SQLite online store),
    so no setting of the user's environment or ``.env`` (a PostgreSQL event log, a remote MLflow, Redis,
    a pinned version) can point the scratch platform at the live one.
    """
    prefect_port = free_port()
    return {
        "RECLOOP_HOME": str(home),
        "RECLOOP_PROFILE": "local",
        "RECLOOP_PREFECT_PORT": str(prefect_port),
        "RECLOOP_PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "RECLOOP_MLFLOW_PORT": str(free_port()),
        "RECLOOP_SERVE_PORT": str(free_port()),
        "RECLOOP_SERVE_HOST": "127.0.0.1",
        "RECLOOP_MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "RECLOOP_MLFLOW_ARTIFACT_ROOT": (home / "mlartifacts").as_uri(),
        "RECLOOP_EVENT_LOG_URL": f"sqlite:///{home / 'eventlog.db'}",
        "RECLOOP_ONLINE_STORE": "sqlite",
        "RECLOOP_SERVE_POLL_INTERVAL_S": "1",
        "RECLOOP_AUTO_PROMOTE": "true",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_HOME": str(home / "prefect"),
    }


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` (and re-read the settings) for the block; restore both after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


class GateHeldBack(RuntimeError):
    """The scratch platform's first model was held back by the gate: there is nothing to serve.

    Attributes:
        evaluation: the evaluate flow's result (``version``, ``passed``, ``decision.reasons``).
    """

    def __init__(self, message: str, evaluation: dict[str, Any]) -> None:
        super().__init__(message)
        self.evaluation = evaluation


@contextlib.contextmanager
def scratch_platform(home: Path, source: str, path: str | None, train_params: Mapping[str, Any] | None = None,
                     force_first: bool = False) -> Iterator[dict[str, Any]]:
    """A platform of its own in ``home`` on free ports, with a served champion; always torn down.

    The Prefect server starts (``supervisor.services``), the event log is migrated, ``pipeline_flow``
    runs on ``source`` (the deploy stage starts the BentoML service), as ``recloop demo`` does. On exit
    every service of ``home`` is stopped (processes, groups, orphans); the home stays on disk.

    Args:
        home / source / path / train_params: the scratch home, the data, the first model's training budget.
        force_first: when the gate holds the first model back, promote it anyway (the version is tagged
            ``forced=true``, ``promoted_by=simulate --force-first``) and deploy it, instead of raising.
    Yields:
        ``{"settings", "url", "pipeline", "startup_s", "first_model"}`` (first_model: version, passed, forced).
    Raises:
        GateHeldBack: the first model did not pass the gate (and not ``force_first``), so nothing serves.
        services.PortInUseError / RuntimeError: a service did not start.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from recloop.logdb import make_engine, upgrade
    from supervisor import services

    home.mkdir(parents=True, exist_ok=True)
    env = scratch_environ(home)
    t0 = time.monotonic()
    with _environ(env), temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"],
                                            PREFECT_HOME: env["PREFECT_HOME"]}):
        settings = get_settings()
        try:
            engine = make_engine(settings.event_log_uri)
            try:
                upgrade(engine)
            finally:
                engine.dispose()
            _say(f"scratch platform in {home} (prefect :{settings.prefect_port}, serving :{settings.serve_port})")
            services.start(settings, "prefect")
            from flows.pipeline import pipeline_flow

            stages = pipeline_flow(source=source, path=path, train_params=dict(train_params or FIRST_TRAIN_PARAMS),
                                   deploy=True, start_service=True)
            evaluation = stages["evaluate"]
            forced = False
            if stages["deploy"] is None:
                reasons = (evaluation.get("decision") or {}).get("reasons") or []
                if not force_first:
                    raise GateHeldBack(f"the gate held the first model (version {evaluation.get('version')}) back "
                                       f"and nothing serves; gate reasons: {'; '.join(reasons)}", evaluation)
                _say(f"the gate held version {evaluation.get('version')} back ({'; '.join(reasons)}); "
                     "--force-first: serving it anyway")
                stages["deploy"] = _force_serve(settings, str(evaluation["version"]), reasons)
                forced = True
            yield {"settings": settings, "url": f"http://{settings.serve_host}:{settings.serve_port}",
                   "pipeline": stages, "startup_s": time.monotonic() - t0,
                   "first_model": {"version": evaluation.get("version"), "passed": evaluation.get("passed"),
                                   "forced": forced}}
        finally:
            _flush_prefect_logs()
            for name in reversed(services.SERVICE_ORDER):
                services.stop(settings, name)
            _say(f"scratch platform stopped (home kept: {home})")


def _force_serve(settings: Settings, version: str, reasons: Sequence[str]) -> dict[str, Any]:
    """Point the served alias at ``version`` despite the gate (tagged as forced) and deploy it."""
    from flows.deploy import deploy_flow
    from registry.aliases import promote
    from registry.tracking import configure_tracking

    client = configure_tracking(settings)
    promote(client, settings.model_name, version, alias=settings.model_alias, reason="simulate --force-first")
    client.set_model_version_tag(settings.model_name, version, "forced", "true")
    client.set_model_version_tag(settings.model_name, version, "forced_over", "; ".join(reasons)[:4900] or "none")
    return deploy_flow(version=version, start_if_down=True)


def _flush_prefect_logs() -> None:
    """Send the buffered Prefect logs before the scratch server stops (else they fail at exit)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 - best effort: a log line lost is not a simulation failure
        pass


# --- the simulation -------------------------------------------------------------------------------------


def lake_histories(events: Any, policy: Any) -> dict[str, list[str]]:
    """User → item ids of the event policy's positives, in lake order (the contract's history order)."""
    positives = policy.positives(events)
    return {str(user): frame["item_id"].astype(str).tolist()
            for user, frame in positives.groupby(positives["user_id"].astype(str), sort=True)}


def sample_users(all_users: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` users drawn without replacement with ``seed`` (all of them when n ≥ their number), sorted."""
    pool = sorted(all_users)
    if n >= len(pool):
        return pool
    rng = np.random.default_rng(seed)
    return sorted(pool[i] for i in rng.choice(len(pool), size=n, replace=False))


def _run_round(sim: Any, driver: HttpDriver, round_no: int, sessions_per_round: int, k: int,
               n_catalogue: int, popularity: Mapping[str, float]) -> dict[str, Any]:
    """``sessions_per_round`` sessions of every simulated user (users interleaved) and the round's metrics."""
    driver.reset_counts()
    results: list[SessionResult] = []
    failed = 0
    t0 = time.perf_counter()
    for s in range(sessions_per_round):
        for user in sim.users():
            try:
                results.append(sim.run_session(user, driver.recommend, driver.feedback,
                                               session=round_no * sessions_per_round + s))
            except ServiceError:
                failed += 1
    wall = time.perf_counter() - t0
    counts = driver.reset_counts()
    versions = counts["versions"]
    return {
        "round": round_no,
        "model_version": max(versions, key=versions.get) if versions else None,
        "model_versions": sorted(versions),
        **round_metrics(results, k, n_catalogue, popularity),
        "failed_sessions": failed,
        "errors": counts["errors"],
        "error_samples": counts["error_samples"],
        "recommends": counts["recommends"],
        "feedbacks": counts["feedbacks"],
        "wall_s": round(wall, 3),
        "sessions_per_s": round(len(results) / wall, 2) if wall > 0 else None,
    }


def _loop_turn(url: str, settings: Settings, train_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """One real ``loop_flow`` turn, then wait until the service serves the champion it leaves."""
    from flows.deploy import DeployError, wait_for_version
    from flows.loop import loop_flow
    from flows.pipeline import champion_version

    t0 = time.monotonic()
    stages = loop_flow(train_params=dict(train_params) if train_params else None, deploy=True, start_service=True)
    evaluation = stages.get("evaluate") or {}
    champion = champion_version()
    headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
    note = None
    try:
        if champion is not None:
            wait_for_version(url, champion, timeout_s=180.0, headers=headers)
    except DeployError as err:
        note = str(err)
    if stages.get("status") == "done" and not evaluation.get("promoted"):
        note = (note + "; " if note else "") + (f"the gate held candidate version {evaluation.get('version')} back; "
                                                f"version {champion} keeps serving")
    return {"status": stages.get("status"), "new_events": stages.get("new_events"),
            "candidate_version": evaluation.get("version"), "passed": evaluation.get("passed"),
            "promoted": evaluation.get("promoted"),
            "gate_reasons": (evaluation.get("decision") or {}).get("reasons"),
            "deployed_version": (stages.get("deploy") or {}).get("version"), "serving_version": champion,
            "note": note, "wall_s": round(time.monotonic() - t0, 2)}


def _log_mlflow(settings: Settings, result: dict[str, Any]) -> str:
    """One run in experiment ``recloop-simulation``: protocol as params, rounds as steps, plot + JSON artifacts."""
    from registry import plots
    from registry.tracking import configure_tracking, ensure_experiment

    client = configure_tracking(settings)
    experiment_id = ensure_experiment(client, SIMULATION_EXPERIMENT, settings=settings)
    p = result["protocol"]
    run = client.create_run(experiment_id, run_name=f"simulate-{p['source']}-{p['users']}u-{p['rounds']}r-s{p['seed']}",
                            tags={"recloop.kind": "simulation", "target": str(p["target"])})
    run_id = run.info.run_id
    try:
        for key in ("source", "users", "rounds", "sessions_per_round", "seed", "truth", "k", "loop", "target"):
            client.log_param(run_id, key, str(p[key])[:500])
        for key, value in (p.get("simulator") or {}).items():
            client.log_param(run_id, f"sim.{key}", str(value)[:500])
        for r in result["rounds"]:
            for key in ("ctr_at_k", "clicks_per_session", "slates_per_session", "skip_rate", "catalogue_share",
                        "novelty", "errors", "failed_sessions", "sessions_per_s", "wall_s"):
                if isinstance(r.get(key), int | float) and math.isfinite(float(r[key])):
                    client.log_metric(run_id, key, float(r[key]), step=int(r["round"]))
            if str(r.get("model_version") or "").isdigit():
                client.log_metric(run_id, "model_version", float(r["model_version"]), step=int(r["round"]))
            if r.get("loop"):
                client.log_metric(run_id, "loop_wall_s", float(r["loop"]["wall_s"]), step=int(r["round"]))
        if result.get("sessions_per_s") is not None:
            client.log_metric(run_id, "sessions_per_s_overall", float(result["sessions_per_s"]))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            plots.ctr_over_rounds(result["rounds"], out / "ctr_over_rounds.png", k=int(p["k"]))
            (out / "simulation.json").write_text(json.dumps(result, indent=1, default=str))
            (out / "simulation.md").write_text(rounds_markdown(result))
            for name in ("ctr_over_rounds.png", "simulation.json", "simulation.md"):
                client.log_artifact(run_id, str(out / name), artifact_path="simulation")
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def simulate(settings: Settings | None = None, *, users: int, rounds: int, sessions_per_round: int, seed: int = 0,
             target_url: str | None = None, source: str = "movielens-100k", path: str | None = None,
             loop: bool | None = None, truth: str = "ease", k: int = 10,
             train_params: Mapping[str, Any] | None = None, loop_train_params: Mapping[str, Any] | None = None,
             home: Path | None = None, force_first: bool = False) -> dict[str, Any]:
    """Simulated users against the real service, round by round, with the real loop between rounds.

    Args:
        settings: the caller's settings (default ``get_settings()``): with ``target_url`` its API key,
            lake, MLflow store and Prefect server are used; without, the scratch platform has its own
            (the API key, ``RECLOOP_API_KEY``, is inherited by the scratch service and the driver alike).
        users: simulated users, sampled with ``seed`` from the dataset's users.
        rounds / sessions_per_round: rounds, and sessions per user in each round.
        seed: the user sample and the simulator's seed.
        target_url: drive this running service instead of starting a scratch platform.
        source / path: the data source of the scratch platform (with ``target_url``: ignored; the
            lake of ``settings`` gives the users and the ground truth).
        loop: run ``loop_flow`` between rounds (default: yes on the scratch platform, no with ``target_url``).
        truth: the simulator's ground-truth model (``ease`` | ``itemknn``).
        k: the slate length.
        train_params: the first model's training budget (default ``FIRST_TRAIN_PARAMS``, as the demo).
        loop_train_params: overrides of the loop's warm retrain (default ``flows.loop.WARM_TRAIN_PARAMS``).
        home: the scratch home (default a new temp dir); kept on disk after the run.
        force_first: serve the scratch platform's first model even when the gate holds it back (tagged
            ``forced``; the protocol's ``first_model`` says so).
    Returns:
        ``{"protocol", "rounds", "sessions_per_s", "mlflow_run_id", "home", "startup_s", "wall_s"}``;
        each round holds its metrics (``round_metrics``), ``model_version(s)``, ``errors``, ``wall_s``,
        ``sessions_per_s`` and, when the loop ran after it, ``loop`` (status, versions, gate, wall time).
    Raises:
        GateHeldBack: the scratch platform's first model did not pass the gate.
        ValueError: bad arguments or no users in the lake.
    """
    if min(users, rounds, sessions_per_round, k) < 1:
        raise ValueError(f"users, rounds, sessions_per_round and k must be >= 1; got {users}, {rounds}, "
                         f"{sessions_per_round}, {k}")
    settings = settings or get_settings()
    loop = (target_url is None) if loop is None else loop
    t0 = time.monotonic()
    protocol: dict[str, Any] = {"source": source, "path": path, "users": users, "rounds": rounds,
                                "sessions_per_round": sessions_per_round, "seed": seed, "truth": truth, "k": k,
                                "loop": loop, "loop_train_params": dict(loop_train_params or {})}
    if target_url is not None:
        protocol.update(source="lake", path=None, target=target_url, home=None, first_model=None)
        return _simulate_on(settings, target_url.rstrip("/"), protocol, t0=t0, startup_s=0.0)
    home = (Path(home) if home else Path(tempfile.mkdtemp(prefix="recloop-simulate-")) / "home").resolve()
    train = dict(train_params or FIRST_TRAIN_PARAMS)
    with scratch_platform(home, source, path, train, force_first=force_first) as platform:
        protocol.update(target="scratch", home=str(home), train_params=train, first_model=platform["first_model"])
        return _simulate_on(platform["settings"], platform["url"], protocol, t0=t0,
                            startup_s=round(platform["startup_s"], 1))


def _simulate_on(settings: Settings, url: str, protocol: dict[str, Any], *, t0: float,
                 startup_s: float) -> dict[str, Any]:
    """The rounds against the service at ``url`` (``settings``: its lake, MLflow store and event policy).

    ``protocol`` holds the arguments of ``simulate`` (users, rounds, sessions_per_round, seed, truth, k,
    loop, loop_train_params, ...); the result's protocol adds the simulator's config and calibration.
    """
    from models.simulator import GroundTruth, SimConfig, UserSimulator
    from recloop.lake import Lake

    k, truth, seed, rounds = protocol["k"], protocol["truth"], protocol["seed"], protocol["rounds"]
    sessions_per_round = protocol["sessions_per_round"]
    events = Lake(settings.lake_path).events()
    if events.empty:
        raise ValueError(f"the lake at {settings.lake_path} holds no events: nothing to simulate users from")
    policy = settings.event_policy
    histories = lake_histories(events, policy)
    chosen = sample_users(list(histories), protocol["users"], seed)
    _say(f"fitting the ground truth ({truth}) on {len(events):,} lake events; {len(chosen)} simulated users")
    ground = GroundTruth.fit(policy.positives(events), kind=truth)
    config = SimConfig(k=k, truth=truth, seed=seed)
    sim = UserSimulator(ground, {u: histories[u] for u in chosen}, config)
    positives = policy.positives(events)["item_id"].astype(str).value_counts()
    popularity = {str(item): float(count) for item, count in positives.items()}
    n_catalogue = len(ground.item_ids)
    out_rounds: list[dict[str, Any]] = []
    with HttpDriver(url, api_key=settings.api_key) as driver:
        for r in range(rounds):
            record = _run_round(sim, driver, r, sessions_per_round, k, n_catalogue, popularity)
            _say(f"round {r}: version {record['model_version']} CTR@{k}={record['ctr_at_k']} "
                 f"skip rate={record['skip_rate']} errors={record['errors']} "
                 f"{record['sessions']} sessions in {record['wall_s']:.1f} s ({record['sessions_per_s']}/s)")
            if protocol["loop"] and r < rounds - 1:
                _say("loop: ingest the feedback, validate, warm retrain, gate, register, deploy ...")
                record["loop"] = _loop_turn(url, settings, protocol["loop_train_params"])
                _say(f"loop {record['loop']['status']} in {record['loop']['wall_s']:.0f} s: candidate "
                     f"v{record['loop']['candidate_version']} promoted={record['loop']['promoted']}; "
                     f"serving v{record['loop']['serving_version']}")
            out_rounds.append(record)
        acknowledged = len(driver.acknowledged)
    session_s = sum(r["wall_s"] for r in out_rounds)
    n_sessions = sum(r["sessions"] for r in out_rounds)
    result: dict[str, Any] = {
        "protocol": {
            **protocol, "url": url, "users": len(chosen), "n_catalogue": n_catalogue,
            "lake_events": int(len(events)), "simulator": asdict(config), "calibration": sim.calibration,
            "event_policy": {**policy.describe(), "sent": {"click": "click", "skip": "skip", "ignore": "nothing"},
                             "linked_by": "request_id + position", "event_id": "sim-<request_id>-<position>"},
            "metrics": "round_metrics: CTR@k = clicks / slots shown; skip rate = skips / slots shown; novelty = "
                       "mean -log2 of the shown items' share of the lake's positive events",
        },
        "rounds": out_rounds,
        "sessions_per_s": round(n_sessions / session_s, 2) if session_s > 0 else None,
        "errors": sum(r["errors"] for r in out_rounds),
        "feedback_acknowledged": acknowledged,
        "startup_s": startup_s,
        "home": protocol.get("home"),
        "mlflow_uri": settings.mlflow_uri,
    }
    result["mlflow_run_id"] = _log_mlflow(settings, result)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    return result


@flow(name="simulate")
def simulate_flow(users: int = 50, rounds: int = 2, sessions_per_round: int = 2, seed: int = 0,
                  target_url: str | None = None, source: str = "movielens-100k", path: str | None = None,
                  loop: bool | None = None, truth: str = "ease", k: int = 10) -> dict[str, Any]:
    """``simulate`` as a Prefect flow, with the per-round table as a markdown artifact (key ``recloop-simulation``).

    Meant for a running platform (``target_url``, e.g. a deployment served by its runner): without one,
    ``simulate`` starts a scratch platform with its own Prefect server, whose flow runs are not this run's.
    """
    result = simulate(get_settings(), users=users, rounds=rounds, sessions_per_round=sessions_per_round, seed=seed,
                      target_url=target_url, source=source, path=path, loop=loop, truth=truth, k=k)
    create_markdown_artifact(key="recloop-simulation", markdown=rounds_markdown(result),
                             description=f"simulated users, MLflow run {result['mlflow_run_id']}")
    return result
