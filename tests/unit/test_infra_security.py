"""The compose profile is secure by default (issue 12): MLflow behind basic auth, loopback ports, API key on."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _env_example() -> dict[str, str]:
    lines = (INFRA / "env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_mlflow_runs_the_basic_auth_app_with_credentials_from_the_env() -> None:
    mlflow = _compose()["services"]["mlflow"]
    assert "--app-name basic-auth" in " ".join(mlflow["command"].split())
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SECRET_KEY:?")
    ini = configparser.ConfigParser()
    ini.read(INFRA / Path(env["MLFLOW_AUTH_CONFIG_PATH"]).name)
    assert ini["mlflow"]["database_uri"].startswith("sqlite:////data/")  # on the data volume
    assert "admin_password" not in ini["mlflow"]


def test_published_ports_bind_to_loopback_unless_configured() -> None:
    services = _compose()["services"]
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert set(published) == {"mlflow", "prefect", "recommender"}  # PostgreSQL and Redis stay internal
    for ports in published.values():
        for port in ports:
            assert re.fullmatch(r"\$\{PUBLISH_HOST:-127\.0\.0\.1\}:\d+(-\d+)?:\d+", port), port  # a range: replicas
    assert _env_example()["PUBLISH_HOST"] == "127.0.0.1"


def test_recommender_requires_an_api_key() -> None:
    env = _compose()["services"]["recommender"]["environment"]
    assert env["RECLOOP_API_KEY"].startswith("${RECLOOP_API_KEY:?")
    example = _env_example()
    assert example["RECLOOP_API_KEY"] and example["MLFLOW_ADMIN_PASSWORD"] and example["MLFLOW_FLASK_SECRET_KEY"]


def test_local_servers_check_host_and_origin() -> None:
    """MLflow answers loopback Host headers and its own UI origin only; Prefect's API its own UI origin."""
    from recloop.settings import Settings
    from registry.tracking import server_command
    from supervisor.services import specs

    settings = Settings(mlflow_port=5123, prefect_port=4321)
    cmd = server_command(settings)
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    origins = cmd[cmd.index("--cors-allowed-origins") + 1].split(",")
    assert set(hosts) == {"127.0.0.1", "127.0.0.1:5123", "localhost", "localhost:5123"}
    assert set(origins) == {"http://127.0.0.1:5123", "http://localhost:5123"}
    prefect = specs(settings)["prefect"]
    assert prefect.env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4321,http://localhost:4321"
