"""MLflow tracking set-up: the backend this process talks to, experiments, and the server command.

Backends: SQLite under ``home`` by default, PostgreSQL (or any SQLAlchemy URL / server) when
``RECLOOP_MLFLOW_TRACKING_URI`` is set. The artifact location of every experiment is explicit
(with a ``sqlite:`` backend and no server MLflow would otherwise write under the working directory).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from recloop.settings import Settings, get_settings

DEFAULT_EXPERIMENT = "recloop"

#: Environment of the MLflow server process: without the job runner it needs ~260 MB instead of ~1.1 GB.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_command(settings: Settings, port: int | None = None, host: str = "127.0.0.1") -> list[str]:
    """The one command line of the MLflow tracking server + UI (``recloop up`` and ``recloop mlflow-ui``).

    Artifacts are served through the server (``--artifacts-destination``), so clients need no access
    to the artifact store. One worker: the UI of one team, ~260 MB with ``SERVER_ENV``. Only loopback
    Host headers and the UI's own origin are allowed (MLflow's DNS-rebinding and CORS guards).

    Args:
        settings: backend URI (``mlflow_uri``), artifact root (``mlflow_artifacts``), default port.
        port: overrides ``settings.mlflow_port``.
        host: bind address (loopback by default).
    Returns:
        argv, starting with the ``mlflow`` executable beside this interpreter.
    """
    port = port or settings.mlflow_port
    origins = f"http://127.0.0.1:{port},http://localhost:{port}"
    return [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--host", host, "--port", str(port),
        "--backend-store-uri", settings.mlflow_uri,
        "--artifacts-destination", settings.mlflow_artifacts,
        "--workers", "1",
        # DNS-rebinding and cross-site guards: only the UI's own origin, only loopback Host headers.
        "--allowed-hosts", f"127.0.0.1,127.0.0.1:{port},localhost,localhost:{port}",
        "--cors-allowed-origins", origins,
    ]


def configure_tracking(settings: Settings | None = None) -> MlflowClient:
    """Point this process's MLflow tracking and registry at the configured backend.

    For SQLite the parent folder is created and the schema initialised here, once, before any
    concurrent use (creating it from several processes at once fails, docs/stack-notes.md).

    Args:
        settings: defaults to ``get_settings()``.
    Returns:
        An ``MlflowClient`` bound to the tracking URI.
    """
    settings = settings or get_settings()
    uri = settings.mlflow_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments(max_results=1)  # creates / migrates the schema now, in one process
    return client


def ensure_experiment(client: MlflowClient, name: str = DEFAULT_EXPERIMENT,
                      settings: Settings | None = None) -> str:
    """Return the id of experiment ``name``, creating it with an explicit artifact location.

    The location is ``<settings.mlflow_artifacts>/<name>`` (a ``file://`` URI under home by default).
    """
    settings = settings or get_settings()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = f"{settings.mlflow_artifacts.rstrip('/')}/{name}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
