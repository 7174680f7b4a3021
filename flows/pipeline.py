"""The whole loop as one Prefect flow: ingest → validate → features → train → evaluate/gate → register → deploy.

Each stage is a subflow (visible in the Prefect UI with its own logs); the run ends with a markdown
artifact (key ``recloop-pipeline``) that states data counts, the validation outcome, the metrics of
the candidate against the champion and the baselines, the gate decision and the deployed version.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.deploy import deploy_flow
from flows.evaluate import evaluate_flow
from flows.features import features_flow
from flows.ingest import ingest_flow
from flows.train import train_flow
from recloop.settings import get_settings


def champion_version() -> str | None:
    """The version the ``champion`` alias points at, or None when there is no champion yet."""
    from registry.aliases import get_alias_version
    from registry.tracking import configure_tracking

    settings = get_settings()
    return get_alias_version(configure_tracking(settings), settings.model_name, settings.model_alias)


def summary_markdown(title: str, stages: dict[str, Any]) -> str:
    """A compact markdown report of one pipeline/loop run (pure)."""
    lines = [f"## {title}", ""]
    ingest = stages.get("ingest") or {}
    if ingest:
        lines += [
            "| data | value |", "|---|---|",
            *(f"| {k} | {ingest.get(k)} |" for k in
              ("batch_id", "events", "new_events", "duplicates_dropped", "rows_quarantined", "bad_share",
               "total_events", "watermark")),
            "",
        ]
    evaluation = stages.get("evaluate") or {}
    if evaluation.get("report_md"):
        lines += ["### Evaluation (test split, full ranking)", "", evaluation["report_md"], ""]
    if evaluation:
        lines += [f"**Gate:** passed={evaluation.get('passed')} promoted={evaluation.get('promoted')} "
                  f"version={evaluation.get('version')}", ""]
    deploy = stages.get("deploy")
    lines += [f"**Deployed version:** {deploy['version'] if deploy else 'unchanged'}"]
    return "\n".join(lines)


def run_training_stages(train_params: dict[str, Any] | None, model_params: dict[str, Any] | None,
                        warm_start: bool, data_version: str | None, deploy: bool,
                        start_service: bool) -> dict[str, Any]:
    """features → train → evaluate/gate/register → deploy (shared by the pipeline and the loop)."""
    logger = get_run_logger()
    stages: dict[str, Any] = {}
    stages["features"] = features_flow()
    champion = champion_version()
    warm_from = "@" + get_settings().model_alias if (warm_start and champion is not None) else None
    stages["train"] = train_flow(source="lake", model_params=model_params, train_params=train_params,
                                 warm_start_from=warm_from, data_version=data_version)
    stages["evaluate"] = evaluate_flow(stages["train"]["run_id"])
    champion = champion_version()  # after the gate: the new version if it was promoted
    if deploy and champion is not None:
        stages["deploy"] = deploy_flow(start_if_down=start_service)
    else:
        stages["deploy"] = None
        logger.info("deploy skipped deploy=%s champion=%s", deploy, champion)
    return stages


@flow(name="pipeline")
def pipeline_flow(source: str = "synthetic", path: str | None = None, train_params: dict[str, Any] | None = None,
                  model_params: dict[str, Any] | None = None, warm_start: bool = False, deploy: bool = True,
                  start_service: bool = True) -> dict[str, Any]:
    """Run the whole loop once on ``source`` and return what each stage reported.

    Args:
        source / path: a ``recloop.sources`` name and its file or folder (synthetic needs no path).
        train_params / model_params: ``TrainConfig`` / ``SASRecConfig`` overrides (e.g. ``{"epochs": 5}``).
        warm_start: initialise from the champion (when there is one).
        deploy: make the service serve the champion afterwards.
        start_service: start the BentoML service if it does not answer.
    Returns:
        ``{"ingest", "features", "train", "evaluate", "deploy"}`` stage results.
    Raises:
        DataValidationError: the validation gate stopped the batch (nothing later runs).
    """
    stages: dict[str, Any] = {"ingest": ingest_flow(source, path)}
    stages.update(run_training_stages(train_params, model_params, warm_start,
                                      stages["ingest"].get("batch_id"), deploy, start_service))
    create_markdown_artifact(key="recloop-pipeline", markdown=summary_markdown("recloop pipeline", stages),
                             description=f"pipeline run on source={source}")
    return stages
