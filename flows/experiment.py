"""The ``online-experiment`` flows: report on the online experiment, and conclude it (promoting the winner).

An online experiment (``recloop.experiments``) serves the champion version against one challenger
version, by A/B test or by interleaving; serving records each answer's experiment and arm in the
exposure log. Here:

1. ``experiment_report``: the exposures and the feedback linked to them go through
   ``recloop.experiment_analysis.analyse_experiment``, which returns a JSON-serialisable report whose
   ``decision`` is ``{"winner": "champion" | "challenger" | None, "test", "p_value", "reason", "effect"}``.
2. ``experiment_report_flow`` (scheduled hourly, ``recloop-online-experiment``): the report of the running
   experiment (else of the latest one) as a Prefect markdown artifact (key ``online-experiment``).
3. ``conclude_experiment`` (``recloop experiment conclude``; as a flow ``conclude_experiment_flow``): stops
   the experiment if it runs, computes the report and acts on its decision. A winning challenger becomes
   champion through the checks of ``recloop model promote`` (``registry.aliases.promote_checked``: it must
   load in a fresh process; a version that failed the offline gate needs ``force``); a winning champion,
   or no winner, leaves the alias where it is. Both versions get ``experiment.*`` tags in MLflow, and the
   report (with the conclusion) is stored as the experiment's ``result``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import prefect  # noqa: F401  (before mlflow: keeps Prefect's console log format)
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError

from recloop.eventlog import EventLog
from recloop.experiment_analysis import analyse_experiment
from recloop.experiments import CONCLUDED, STOPPED, ExperimentStore, NoRunningExperiment, OnlineExperiment
from recloop.exposures import ExposureLog
from recloop.settings import Settings, get_settings
from registry import aliases, tracking

ARTIFACT_KEY = "online-experiment"
#: Exposures and feedback are read from this long before the start (clocks of serving hosts may differ).
READ_MARGIN = timedelta(minutes=5)
WINNERS = ("champion", "challenger", None)


def experiment_report(experiment: OnlineExperiment, settings: Settings) -> dict[str, Any]:
    """The analysis of ``experiment`` from the exposure log and the feedback linked to it.

    Reads the exposures shown, and the linked events received, since ``READ_MARGIN`` before the start
    (``ExposureLog.read``, ``EventLog.linked``) and passes them, with ``settings.event_policy``, to
    ``recloop.experiment_analysis.analyse_experiment``, which picks this experiment's rows.

    Returns:
        The analysis' report (JSON-serialisable, with a ``decision``).
    """
    since = experiment.started_at - READ_MARGIN
    exposure_log = ExposureLog(settings.event_log_uri)
    try:
        exposures, items = exposure_log.read(since=since)
    finally:
        exposure_log.close()
    event_log = EventLog(settings.event_log_uri)
    try:
        events = event_log.linked(since=since)
    finally:
        event_log.close()
    return analyse_experiment(experiment, exposures, items, events, settings.event_policy)


def report_markdown(experiment: OnlineExperiment, report: dict[str, Any] | None, *, full: bool = True) -> str:
    """The experiment's definition, the decision and the main numbers as markdown.

    With ``full``, the whole report (less the definitions of its protocol) follows as a JSON block.
    """
    e = experiment
    lines = [f"# Online experiment {e.experiment_id} ({e.status})", "",
             "| setting | value |", "|---|---|",
             f"| mode | {e.mode} |",
             f"| champion | version {e.champion_version} |",
             f"| challenger | version {e.challenger_version} |",
             f"| weights (champion/challenger) | {_num(e.weights[0])} / {_num(e.weights[1])} |"
             + (" (not used by interleaving)" if e.mode == "interleave" else ""),
             f"| started | {e.started_at.isoformat()} |"]
    if e.stopped_at is not None:
        lines.append(f"| stopped | {e.stopped_at.isoformat()} |")
    if e.concluded_at is not None:
        lines.append(f"| concluded | {e.concluded_at.isoformat()} |")
    if not report:
        return "\n".join([*lines, "", "No report yet."]) + "\n"
    decision = report.get("decision") or {}
    winner = decision.get("winner")
    lines += ["", f"**Decision: {'no winner' if winner is None else winner + ' wins'}**"
              + (f" by {decision['test']}: p = {_num(decision.get('p_value'))}, effect = {_num(decision.get('effect'))}"
                 if decision.get("test") else ""), ""]
    if decision.get("reason"):
        lines += [f"{decision['reason']}", ""]
    conclusion = report.get("conclusion")
    if conclusion:
        moved = (f"version {conclusion.get('alias_version')} promoted to {conclusion.get('alias')}"
                 + (" (forced)" if conclusion.get("forced") else "")
                 if conclusion.get("promoted") else
                 f"{conclusion.get('alias')} stays on version {conclusion.get('alias_version')}")
        lines += [f"Conclusion: {moved}.", ""]
    if report.get("mode") == "interleave":
        lines += _interleaving_lines(report)
    else:
        lines += _ab_lines(report)
    if not full:
        return "\n".join(lines) + "\n"
    rest = {k: v for k, v in report.items() if k not in ("decision", "conclusion", "experiment")}
    if isinstance(rest.get("protocol"), dict):
        rest["protocol"] = {k: v for k, v in rest["protocol"].items() if k != "definitions"}
    lines += ["", "<details><summary>full report</summary>", "", "```json",
              json.dumps(rest, indent=2, default=str), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def _ab_lines(report: dict[str, Any]) -> list[str]:
    """Per-arm table, lift, sequential test, Welch and SRM of an A/B report (missing parts are skipped)."""
    lines: list[str] = []
    arms = report.get("arms")
    if isinstance(arms, dict) and arms and all(isinstance(v, dict) for v in arms.values()):
        cols = [c for c in ("users", "requests", "impressions", "clicks", "ctr", "mean_user_ctr")
                if any(c in v for v in arms.values())]
        lines += ["| arm | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {arm} | " + " | ".join(_num(v.get(c)) for c in cols) + " |" for arm, v in arms.items()]
        lines.append("")
    lift, seq, welch, srm = (report.get(k) or {} for k in ("lift", "sequential", "welch", "srm"))
    if lift:
        ci = lift.get("ci")
        lines.append(f"- lift of the mean per-user CTR: {_num(lift.get('relative'))}"
                     + (f" (CI {_num(ci[0])} .. {_num(ci[1])})" if ci else ""))
    if seq:
        lines.append(f"- sequential test (mSPRT): always-valid p = {_num(seq.get('p_value'))} over "
                     f"{_num(seq.get('n_looks'))} looks")
    if welch:
        lines.append(f"- Welch t-test (fixed horizon, for reference): p = {_num(welch.get('p_value'))}")
    if srm:
        lines.append(f"- sample ratio mismatch: p = {_num(srm.get('p_value'))}"
                     + (" **flagged**" if srm.get("flagged") else ""))
    return lines


def _interleaving_lines(report: dict[str, Any]) -> list[str]:
    """Wins, losses, ties, delta and the sign test of an interleaving report."""
    ci = report.get("delta_ci")
    teams = report.get("clicks_by_team") or {}
    sign = report.get("sign_test") or {}
    return [
        "| requests | users | clicks | champion clicks | challenger clicks | wins | losses | ties | no click |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(_num(x) for x in (
            report.get("requests"), report.get("users"), report.get("clicks"), teams.get("champion"),
            teams.get("challenger"), report.get("wins"), report.get("losses"), report.get("ties"),
            report.get("no_click"))) + " |",
        "",
        f"- delta (> 0 favours the challenger): {_num(report.get('delta'))}"
        + (f" (CI {_num(ci[0])} .. {_num(ci[1])})" if ci else ""),
        f"- sign test: p = {_num(sign.get('p_value'))} ({_num(sign.get('wins'))} wins of {_num(sign.get('n'))})",
    ]


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow run (the CLI, tests)
        return logging.getLogger("recloop.flows.experiment")


def _tag(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float) and not math.isfinite(value):
        return "none"
    return str(value)


def conclude_experiment(settings: Settings, *, force: bool = False, client: MlflowClient | None = None,
                        load_check: Callable[..., aliases.LoadCheck] | None = None,
                        now: datetime | None = None) -> dict[str, Any]:
    """Stop the online experiment (if running), analyse it, act on the decision and mark it concluded.

    The experiment is the running one, else the latest if it is stopped (``recloop experiment stop`` first).
    When the challenger wins it becomes champion (``settings.model_alias``) through
    ``registry.aliases.promote_checked``, as ``recloop model promote`` does: it must load and smoke-score in a
    fresh process, and a version that failed the offline gate is refused unless ``force``. A refused
    promotion raises and leaves the experiment stopped, not concluded, so it can be concluded again with
    ``force``. When the alias moved during the experiment to a third version, the comparison does not
    hold for it: refused unless ``force``. A winning champion, or no winner, leaves the alias.

    Both versions are tagged ``experiment.id``, ``.mode``, ``.arm``, ``.winner``, ``.test``, ``.p_value``,
    ``.effect``, ``.decided_at`` and ``.forced`` (strings; "none" when absent). The report, with a
    ``conclusion`` entry (promoted, alias, alias_version, forced, decided_at, warnings), becomes the
    experiment's ``result``.

    Args:
        settings: the platform's settings (event-log database, model name, alias, tracking URI, policy).
        force: promote a winning challenger even over the checks (tagged ``forced=true`` by
            ``promote_checked`` and ``experiment.forced=true``).
        client: an MLflow client (default ``registry.tracking.configure_tracking(settings)``).
        load_check: the fresh-process load check (default ``registry.aliases.check_loads``).
        now: the decision time (default now, UTC).
    Returns:
        ``{"experiment": OnlineExperiment.as_dict(), "report": dict, "promoted": bool, "alias_version": str|None}``.
    Raises:
        NoRunningExperiment: no experiment is running and the latest is not stopped.
        registry.aliases.PromotionRefused: the challenger won but a check refused it (not forced).
        ValueError: the report's decision names an unknown winner.
    """
    logger = _logger()
    decided_at = now or datetime.now(UTC)
    store = ExperimentStore(settings.event_log_uri)
    try:
        experiment = store.active()
        if experiment is not None:
            experiment = store.stop(experiment.experiment_id, now=decided_at)
            logger.info("online experiment %s stopped", experiment.experiment_id)
        else:
            experiment = store.latest()
            if experiment is None or experiment.status != STOPPED:
                what = "none was started" if experiment is None else \
                    f"the latest, {experiment.experiment_id}, is {experiment.status}"
                raise NoRunningExperiment(f"no online experiment is running or stopped ({what})")
        report = experiment_report(experiment, settings)
        decision = report.get("decision") or {}
        winner = decision.get("winner")
        if winner not in WINNERS:
            raise ValueError(f"the analysis' decision names winner={winner!r}; expected one of {WINNERS}")

        client = client or tracking.configure_tracking(settings)
        name, alias = settings.model_name, settings.model_alias
        champion, challenger = experiment.champion_version, experiment.challenger_version
        current = aliases.get_alias_version(client, name, alias)
        warnings: list[str] = []
        promoted = False
        forced = False
        if winner == "challenger":
            if current not in (champion, challenger):
                moved = (f"the {alias!r} alias moved to version {current} during the experiment (it started on "
                         f"version {champion}); the experiment did not compare the challenger with it")
                if not force:
                    raise aliases.PromotionRefused(name, challenger, alias, [moved])
                warnings.append(moved)
            move = aliases.promote_checked(
                client, name, challenger, alias=alias, tracking_uri=settings.mlflow_uri, force=force,
                reason=f"online experiment {experiment.experiment_id}",
                load_check=load_check or aliases.check_loads,
            )
            promoted = move.previous != move.version
            forced = force and promoted
            logger.info("online experiment %s: challenger %s won; %s -> %s", experiment.experiment_id, challenger,
                        move.previous, move.version)
        else:
            logger.info("online experiment %s: %s; %s stays on %s", experiment.experiment_id,
                        "no winner" if winner is None else f"{winner} won", alias, current)
        alias_version = aliases.get_alias_version(client, name, alias)
        common = {
            "experiment.id": experiment.experiment_id,
            "experiment.mode": experiment.mode,
            "experiment.winner": _tag(winner),
            "experiment.test": _tag(decision.get("test")),
            "experiment.p_value": _tag(decision.get("p_value")),
            "experiment.effect": _tag(decision.get("effect")),
            "experiment.decided_at": decided_at.isoformat(),
            "experiment.forced": "true" if forced else "false",
        }
        for arm, version in (("champion", champion), ("challenger", challenger)):
            for key, value in {**common, "experiment.arm": arm}.items():
                client.set_model_version_tag(name, version, key, value)
        conclusion = {"promoted": promoted, "alias": alias, "alias_version": alias_version, "forced": forced,
                      "decided_at": decided_at.isoformat(), "warnings": warnings}
        concluded = store.conclude(experiment.experiment_id, {**report, "conclusion": conclusion}, now=decided_at)
    finally:
        store.close()
    return {"experiment": concluded.as_dict(), "report": report, "promoted": promoted,
            "alias_version": alias_version}


@flow(name="online-experiment")
def experiment_report_flow() -> dict[str, Any]:
    """Report on the running online experiment (else the latest one) as a markdown artifact.

    A concluded experiment's stored result is shown as it is; otherwise the analysis runs now.

    Returns:
        ``{"experiment": OnlineExperiment.as_dict() | None, "report": dict | None, "report_md": str}``.
    """
    logger = _logger()
    settings = get_settings()
    with ExperimentStore(settings.event_log_uri) as store:
        experiment = store.active() or store.latest()
    if experiment is None:
        report_md = "# Online experiment\n\nNone has been started (`recloop experiment start`).\n"
        create_markdown_artifact(key=ARTIFACT_KEY, markdown=report_md, description="no online experiment")
        logger.info("no online experiment")
        return {"experiment": None, "report": None, "report_md": report_md}
    if experiment.status == CONCLUDED and experiment.result is not None:
        report = experiment.result
    else:
        report = experiment_report(experiment, settings)
    report_md = report_markdown(experiment, report)
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=report_md,
                             description=f"online experiment {experiment.experiment_id} ({experiment.status})")
    decision = report.get("decision") or {}
    logger.info("online experiment %s (%s): winner=%s test=%s p=%s", experiment.experiment_id, experiment.status,
                decision.get("winner"), decision.get("test"), decision.get("p_value"))
    return {"experiment": experiment.as_dict(), "report": report, "report_md": report_md}


@flow(name="conclude-online-experiment")
def conclude_experiment_flow(force: bool = False) -> dict[str, Any]:
    """``conclude_experiment`` with the platform's settings, plus the markdown artifact (key ``online-experiment``)."""
    out = conclude_experiment(get_settings(), force=force)
    experiment = OnlineExperiment.from_dict(out["experiment"])
    report_md = report_markdown(experiment, experiment.result)
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=report_md,
                             description=f"online experiment {experiment.experiment_id} concluded")
    return {**out, "report_md": report_md}
