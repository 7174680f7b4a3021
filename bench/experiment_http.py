"""A/B versus interleaving over the REAL HTTP service, one seed (``python -m bench.experiment_http --json``).

A scratch platform (``flows.simulate.scratch_platform``) trains and serves a SASRec champion on ml-100k
(version A, strong). A weak version B of the same architecture (train_flow, 1 epoch, registered by
evaluate_flow with auto_promote off; the alias is set back to A in any case) is the challenger. Simulated
users (``models.simulator.UserSimulator``, EASE truth, seed 0) are driven through ``HttpDriver`` first in an
A/B experiment, then (fresh simulator, same users and seed) in an interleaving experiment. Every
``--every`` sessions ``analyse_experiment`` runs on the service's exposure log and linked events; the
run stops at the first winner or at ``--cap`` sessions (or ``--max-seconds`` per method).

One JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (REPO / ".." / "shared" / "data" / "ml-100k").resolve()


def _say(msg: str) -> None:
    print(f"[experiment_http {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _wait_for_experiment(url: str, user_ids: list[str], experiment_id: str | None, headers: dict[str, str],
                         timeout_s: float = 90.0) -> float:
    """Poll /recommend until the answers carry ``experiment_id`` (None: until they carry none)."""
    t0 = time.monotonic()
    i = 0
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        while time.monotonic() - t0 < timeout_s:
            body = client.post("/recommend", json={"user_id": user_ids[i % len(user_ids)], "k": 10}).json()
            if body.get("experiment_id") == experiment_id:
                return time.monotonic() - t0
            i += 1
            time.sleep(0.5)
    raise TimeoutError(f"the service did not serve experiment {experiment_id} within {timeout_s} s")


def _run_method(mode: str, settings: Any, url: str, a: str, b: str, ground: Any, histories: dict[str, list[str]],
                users: list[str], seed: int, cap: int, every: int, max_seconds: float) -> dict[str, Any]:
    from flows.simulate import HttpDriver, ServiceError
    from models.simulator import SimConfig, UserSimulator
    from recloop.eventlog import EventLog
    from recloop.experiment_analysis import analyse_experiment
    from recloop.experiments import ExperimentStore
    from recloop.exposures import ExposureLog

    url_db = settings.event_log_uri
    store = ExperimentStore(url_db)
    headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
    experiment = store.start(mode=mode, champion_version=a, challenger_version=b)
    _say(f"{mode}: started {experiment.experiment_id} (champion A=v{a}, challenger B=v{b}); waiting for the service")
    out: dict[str, Any] = {"mode": mode, "experiment_id": experiment.experiment_id}
    try:
        out["pickup_s"] = round(_wait_for_experiment(url, users, experiment.experiment_id, headers), 1)
        # the probe requests above are exposures too, before any simulated session: read only after this point
        sim = UserSimulator(ground, {u: histories[u] for u in users}, SimConfig(seed=seed))
        order = list(sim.users())
        trajectory: list[dict[str, Any]] = []
        first = None
        failed = 0
        done = 0
        session_wall = 0.0
        t_start = time.perf_counter()
        from datetime import UTC, datetime

        since = datetime.now(UTC)
        with HttpDriver(url, api_key=settings.api_key) as driver:
            while done < cap:
                t0 = time.perf_counter()
                n = min(every, cap - done)
                for j in range(done, done + n):
                    try:
                        sim.run_session(order[j % len(order)], driver.recommend, driver.feedback,
                                        session=j // len(order))
                    except ServiceError:
                        failed += 1
                done += n
                session_wall += time.perf_counter() - t0
                time.sleep(0.3)  # exposures are flushed every 100 ms
                ex, it = ExposureLog(url_db, create=False).read(since=since)
                ev = EventLog(url_db, create=False).linked()
                exp_ex = ex[ex["experiment_id"] == experiment.experiment_id] if "experiment_id" in ex else ex
                report = analyse_experiment(experiment, exp_ex, it[it["request_id"].isin(exp_ex["request_id"])],
                                            ev, settings.event_policy)
                d = report["decision"]
                row = {"sessions": done, "winner": d["winner"], "p_value": d["p_value"], "effect": d.get("effect"),
                       "exposures": int(len(exp_ex))}
                trajectory.append(row)
                _say(f"{mode}: {done} sessions p={d['p_value']} winner={d['winner']} errors={driver.errors}")
                if d["winner"] is not None:
                    first = row
                    break
                if time.perf_counter() - t_start > max_seconds:
                    _say(f"{mode}: time budget {max_seconds} s spent at {done} sessions")
                    break
            errors = driver.errors
            error_samples = driver.error_log[:5]
            versions = dict(driver.versions)
        final_detail = ({arm: {k: report["arms"][arm].get(k) for k in ("users", "requests", "impressions", "clicks",
                                                                       "ctr", "mean_user_ctr")}
                         for arm in ("champion", "challenger")} if mode == "ab" and "arms" in report else
                        {k: report.get(k) for k in ("requests", "wins", "losses", "ties", "no_click", "delta")})
        out.update({
            "significant": first is not None,
            "sessions_to_significance": first["sessions"] if first else None,
            "result": (f"significant after {first['sessions']} sessions" if first
                       else f"not significant at {done} sessions (cap {cap})"),
            "winner": first["winner"] if first else None,
            "winner_version": ({"champion": a, "challenger": b}.get(first["winner"]) if first else None),
            "picked_strong": bool(first and first["winner"] == "champion"),
            "p_value": (first or trajectory[-1])["p_value"],
            "effect": (first or trajectory[-1])["effect"],
            "sessions_run": done, "failed_sessions": failed, "errors": errors, "error_samples": error_samples,
            "served_versions": versions,
            "session_wall_s": round(session_wall, 1),
            "sessions_per_s": round(done / session_wall, 2) if session_wall > 0 else None,
            "decision_test": report["decision"].get("test"), "decision_reason": report["decision"].get("reason"),
            "last_report": final_detail, "srm": report.get("srm"), "trajectory": trajectory,
        })
    finally:
        store.stop(experiment.experiment_id)
        _say(f"{mode}: experiment stopped")
    try:
        _wait_for_experiment(url, users, None, headers, timeout_s=30.0)
    except TimeoutError as err:
        out["note"] = str(err)
    return out


def run(data: Path, seed: int, n_users: int, cap: int, every: int, max_seconds: float,
        first_train: dict[str, Any], weak_train: dict[str, Any]) -> dict[str, Any]:
    from flows.simulate import lake_histories, sample_users, scratch_platform
    from models.simulator import GroundTruth
    from recloop.lake import Lake

    t0 = time.monotonic()
    home = (Path(tempfile.mkdtemp(prefix="recloop-exphttp-")) / "home").resolve()
    with scratch_platform(home, "movielens-100k", str(data), first_train) as platform:
        settings, url = platform["settings"], platform["url"]
        a = str(platform["first_model"]["version"])
        startup = round(platform["startup_s"], 1)
        _say(f"platform up in {startup} s: champion A = v{a} at {url}")
        from flows.evaluate import evaluate_flow
        from flows.train import train_flow
        from registry.aliases import set_alias
        from registry.tracking import configure_tracking

        tw = time.monotonic()
        trained = train_flow(source="lake", train_params=weak_train)
        ev = evaluate_flow(trained["run_id"], auto_promote=False)
        b = str(ev["version"])
        client = configure_tracking(settings)
        from registry.aliases import get_alias_version

        alias_before = get_alias_version(client, settings.model_name, settings.model_alias)
        set_alias(client, settings.model_name, settings.model_alias, a)
        _say(f"weak B = v{b} registered in {time.monotonic() - tw:.0f} s (gate passed={ev['passed']}); "
             f"alias was v{alias_before}, set to v{a}")
        weak_metrics = {k: v for k, v in (ev.get("metrics") or {}).items() if isinstance(v, int | float)}
        events = Lake(settings.lake_path).events()
        policy = settings.event_policy
        histories = lake_histories(events, policy)
        users = sample_users(list(histories), n_users, seed)
        ground = GroundTruth.fit(policy.positives(events), kind="ease")
        results = {}
        for mode in ("ab", "interleave"):
            results[mode] = _run_method(mode, settings, url, a, b, ground, histories, users, seed, cap, every,
                                        max_seconds)
        sa, si = results["ab"]["sessions_to_significance"], results["interleave"]["sessions_to_significance"]
        ratio = (sa / si) if sa and si else None
        lower = (results["ab"]["sessions_run"] / si) if (sa is None and si) else None
        protocol = {
            "data": f"ml-100k ({data}), ingested by the scratch pipeline", "seed": seed,
            "service": f"real BentoML HTTP service of a scratch platform ({url}), HttpDriver /recommend + /feedback",
            "model_A": {"version": a, "role": "champion (strong)", "how": f"pipeline_flow first model, SASRec, "
                        f"train_params={first_train}, gate passed={platform['first_model']['passed']}"},
            "model_B": {"version": b, "role": "challenger (weak)", "how": f"train_flow(source='lake', "
                        f"train_params={weak_train}) same architecture (settings' SASRec), registered by "
                        f"evaluate_flow(auto_promote=False); gate passed={ev['passed']}; alias reset to A",
                        "alias_after_register": alias_before},
            "users": f"{len(users)} lake users sampled with seed {seed} (flows.simulate.sample_users); "
                     "UserSimulator(SimConfig(seed=0)), EASE ground truth on the lake's positives; session j goes "
                     "to user order[j % n] with session number j // n; fresh simulator per method",
            "cap_sessions": cap, "max_seconds_per_method": max_seconds,
            "decision_cadence": f"analyse_experiment every {every} sessions (0.3 s flush wait), stop at first winner",
            "tests": "A/B: mSPRT always-valid p (SRM checked); interleaving: two-sided sign test (fixed-horizon test "
                     "looked at repeatedly: overstates confidence)",
            "arms": "A/B: assign_arm by the experiment's random salt, 50/50",
        }
        return {"protocol": protocol, "startup_s": startup, "weak_eval_metrics": weak_metrics,
                "ab": results["ab"], "interleave": results["interleave"],
                "ratio_ab_over_interleave": ratio, "ratio_lower_bound_ab_censored": lower,
                "errors_total": results["ab"]["errors"] + results["interleave"]["errors"],
                "home": str(home), "wall_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the JSON document (always printed)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--cap", type=int, default=1000)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--max-seconds", type=float, default=240.0)
    p.add_argument("--first-epochs", type=int, default=20)
    p.add_argument("--first-seconds", type=float, default=90.0)
    p.add_argument("--weak-epochs", type=int, default=1)
    args = p.parse_args(argv)
    out = run(args.data, args.seed, args.users, args.cap, args.every, args.max_seconds,
              {"epochs": args.first_epochs, "max_train_seconds": args.first_seconds},
              {"epochs": args.weak_epochs, "max_train_seconds": 30.0})
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
