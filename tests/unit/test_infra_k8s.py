"""The scaled-out deployment (issue 22, part 3), checked statically: infra/k8s/ (kustomize) and the compose profile.

Nothing here starts a cluster or a server. The manifests parse, kustomize lists every one of them, they
validate offline against the Kubernetes schemas shipped by ``kubernetes-validate`` (strict: no unknown
fields), every ``RECLOOP_*`` name anywhere in infra/ is a field of ``recloop.settings.Settings``, and every
probe and health check points at a route the process really serves: the recommender's from
serving/service.py and BentoML's system routes, MLflow's and Prefect's from supervisor/services.py.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
#: The Kubernetes version the manifests are validated against (schemas shipped by kubernetes-validate).
K8S_VERSION = "1.33.0"
SERVE_TARGET = "serving.service:Recommender"
#: Files of infra/ that may name RECLOOP_* variables (every text file there).
INFRA_TEXT = ("*.yaml", "*.yml", "*.ini", "*.sql", "Dockerfile", "env.example")
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


# ---------------------------------------------------------------- loading


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@cache
def _k8s_docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every non-empty YAML document of infra/k8s (kustomization.yaml aside)."""
    return tuple((path.name, doc) for path in _k8s_files() for doc in yaml.safe_load_all(path.read_text())
                 if doc is not None)


def _docs(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_docs() if doc.get("kind") == kind]


def _doc(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in _docs(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def _workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_docs() if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def _containers(workload: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])


def _argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


@cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _cli_option(argv: list[str], option: str) -> str:
    assert option in argv, f"{option} missing in {argv}"
    return argv[argv.index(option) + 1]


# ---------------------------------------------------------------- sources of truth


@cache
def _settings_env_names() -> frozenset[str]:
    """The environment names ``Settings`` reads: ``env_prefix + FIELD``, or a field's alias(es)."""
    from pydantic import AliasChoices, AliasPath

    from recloop.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names: set[str] = set()
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias or info.alias
        if alias is None:
            names.add(f"{prefix}{field}".upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, AliasPath) and isinstance(alias.path[0], str):
            names.add(alias.path[0].upper())
    return frozenset(names)


def _frozenset_literal(tree: ast.Module, name: str) -> frozenset[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return frozenset(ast.literal_eval(node.value.args[0]))  # frozenset({...})
    raise AssertionError(f"{name} not found")


@cache
def _serving_get_routes() -> frozenset[str]:
    """GET routes of the recommender that need no API key: serving/service.py's ``OPEN_PATHS`` that are not
    ``@bentoml.api`` routes (those are POST), and that BentoML registers itself (``get_system_routes``)."""
    tree = ast.parse((ROOT / "serving" / "service.py").read_text())
    open_paths, api_paths = _frozenset_literal(tree, "OPEN_PATHS"), _frozenset_literal(tree, "API_PATHS")
    api_methods = {
        f"/{fn.name}"
        for cls in tree.body if isinstance(cls, ast.ClassDef)
        for fn in cls.body if isinstance(fn, ast.FunctionDef)
        for dec in fn.decorator_list
        if ast.unparse(dec.func if isinstance(dec, ast.Call) else dec) == "bentoml.api"
    }
    assert api_methods == api_paths, "API_PATHS no longer lists the @bentoml.api routes"
    spec = importlib.util.find_spec("bentoml")  # the package's location only: nothing is imported
    assert spec is not None and spec.origin is not None
    base_app = (Path(spec.origin).parent / "_internal" / "server" / "base_app.py").read_text()
    system = frozenset(re.findall(r'join_paths\(path_prefix, "(/[a-z]+)"\)', base_app))
    assert {"/livez", "/readyz"} <= system, system
    return frozenset((open_paths - api_paths) & system)


@cache
def _supervisor_health_paths() -> dict[str, str]:
    """Service name → the path of the health URL ``recloop up`` waits on (supervisor/services.py ``specs``)."""
    tree = ast.parse((ROOT / "supervisor" / "services.py").read_text())
    paths: dict[str, str] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "ServiceSpec"
                and len(node.args) >= 3 and isinstance(node.args[2], ast.JoinedStr)):
            tail = node.args[2].values[-1]
            assert isinstance(tail, ast.Constant)
            paths[node.args[0].value] = tail.value
    assert {"prefect", "mlflow", "serving"} <= set(paths), paths
    return paths


@cache
def _prefect_worker_health() -> tuple[str, int]:
    """The Prefect worker's health route and default port (``--with-healthcheck``), from its source."""
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    pkg = Path(spec.origin).parent
    server = (pkg / "workers" / "server.py").read_text()
    route = re.search(r'add_api_route\("(/[a-z]+)", perform_health_check', server)
    settings = (pkg / "settings" / "models" / "worker.py").read_text()
    port = re.search(r"port: int = Field\(\s*default=(\d+)", settings)
    assert route and port
    return route.group(1), int(port.group(1))


def _expected_paths(argv: list[str]) -> set[str] | None:
    """The health routes a container's command serves (None: a command this test does not know)."""
    text = " ".join(argv)
    if SERVE_TARGET in text:
        return set(_serving_get_routes())
    if argv[:2] == ["mlflow", "server"]:
        return {_supervisor_health_paths()["mlflow"]}
    if argv[:3] == ["prefect", "server", "start"]:
        return {_supervisor_health_paths()["prefect"]}
    if argv[:3] == ["prefect", "worker", "start"]:
        return {_prefect_worker_health()[0]}
    return None


# ---------------------------------------------------------------- parsing and kustomize


def test_every_infra_yaml_document_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml"))
    assert K8S / "kustomization.yaml" in files and INFRA / "compose.yaml" in files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    for name, doc in _k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{name}: {doc.get('kind')}"
        assert doc["metadata"].get("name"), name


def test_kustomization_lists_every_manifest_and_one_namespace() -> None:
    kz = _kustomization()
    resources = kz["resources"]
    assert len(resources) == len(set(resources))
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization resource {resource} does not exist"
    assert sorted(resources) == sorted(p.name for p in _k8s_files()), "a manifest is not in the kustomization"
    for generator in kz.get("configMapGenerator", []) + kz.get("secretGenerator", []):
        for file in generator.get("files", []):
            assert (K8S / file.split("=")[-1]).is_file(), f"generator file {file} does not exist"
    namespace = kz["namespace"]
    assert [d["metadata"]["name"] for d in _docs("Namespace")] == [namespace]
    for name, doc in _k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{name}: {doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_renders_offline() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert len(kinds) == len(_k8s_docs()) + len(_kustomization().get("configMapGenerator", []))


def test_manifests_validate_offline_strict() -> None:
    import kubernetes_validate

    failures = []
    for name, doc in _k8s_docs():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = "/".join(str(p) for p in err.path)
            failures.append(f"{name} {doc['kind']}/{doc['metadata']['name']} {path}: {err.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as err:
            failures.append(f"{name}: {err}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- settings names


def test_every_recloop_variable_in_infra_is_a_settings_field() -> None:
    known = _settings_env_names()
    assert {"RECLOOP_HOME", "RECLOOP_SERVE_PORT", "RECLOOP_API_KEY"} <= known
    files = sorted({p for pattern in INFRA_TEXT for p in INFRA.rglob(pattern)})
    seen: dict[str, list[str]] = {}
    for path in files:
        for name in re.findall(r"\bRECLOOP_[A-Z0-9_]+", path.read_text()):
            seen.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert len(seen) >= 10, sorted(seen)
    unknown = {name: sorted(set(where)) for name, where in seen.items() if name not in known}
    assert not unknown, f"not fields of recloop.settings.Settings: {unknown}"


def _k8s_recloop_env() -> dict[str, str]:
    settings = _doc("ConfigMap", "recloop-settings")["data"]
    secrets = _doc("Secret", "recloop-secrets")["stringData"]
    return {k: str(v) for k, v in {**settings, **secrets}.items() if k.startswith("RECLOOP_")}


def test_compose_and_k8s_set_the_same_settings_and_both_load(monkeypatch: pytest.MonkeyPatch) -> None:
    compose_env = {k: v for k, v in _env_file(INFRA / "env.example").items() if k.startswith("RECLOOP_")}
    k8s_env = _k8s_recloop_env()
    assert set(k8s_env) == set(compose_env), set(k8s_env) ^ set(compose_env)
    assert k8s_env["RECLOOP_PROFILE"] == compose_env["RECLOOP_PROFILE"] == "prod"
    from recloop.settings import Settings

    for env in (compose_env, k8s_env):  # the values are valid settings (types, literals, the event policy)
        for key in [k for k in os.environ if k.startswith("RECLOOP_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)
        assert settings.online_store == "redis" and settings.event_log_uri.startswith("postgresql+psycopg://")


def test_secrets_hold_placeholders_only() -> None:
    secrets = _docs("Secret")
    assert secrets
    for secret in secrets:
        assert "data" not in secret, "base64 data in the template"
        for key, value in secret["stringData"].items():
            assert "change-me" in str(value), f"{secret['metadata']['name']}.{key} is not a placeholder"


# ---------------------------------------------------------------- probes, ports, routes


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"container {container['name']}: no port named {port!r}"
    return named[port]


def test_probes_point_at_real_routes_and_container_ports() -> None:
    probed = 0
    for workload in _workloads():
        for container in _containers(workload):
            argv = _argv(container)
            ports = {p["containerPort"] for p in container.get("ports", [])}
            for probe_name in PROBES:
                get = container.get(probe_name, {}).get("httpGet")
                if get is None:
                    continue
                probed += 1
                where = f"{workload['metadata']['name']}/{container['name']} {probe_name}"
                expected = _expected_paths(argv)
                assert expected is not None, f"{where}: unknown command {argv}"
                assert get["path"] in expected, f"{where}: {get['path']} is not one of {sorted(expected)}"
                assert _port_number(container, get["port"]) in ports, f"{where}: port {get['port']}"
            if "--port" in argv:  # the server listens where the pod says it does
                assert int(_cli_option(argv, "--port")) in ports, f"{container['name']}: --port not a container port"
            if argv[:3] == ["prefect", "worker", "start"]:
                assert _prefect_worker_health()[1] in ports
    assert probed >= 8


def test_serving_scales_out_with_probes_on_livez_and_readyz() -> None:
    deployment = _doc("Deployment", "recloop-serving")
    assert deployment["spec"]["replicas"] == 3
    (container,) = _containers(deployment)
    argv = _argv(container)
    assert SERVE_TARGET in argv and _cli_option(argv, "--host") == "0.0.0.0"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) <= set(container["resources"]["limits"])
    # the same command as the compose recommender and as `recloop up`
    compose_argv = shlex.split(_compose()["services"]["recommender"]["command"])
    assert compose_argv == argv
    assert _supervisor_health_paths()["serving"] in _serving_get_routes()
    hpa = _doc("HorizontalPodAutoscaler", "recloop-serving")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "recloop-serving"}
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    pdb = _doc("PodDisruptionBudget", "recloop-serving")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_services_select_pods_and_target_their_ports() -> None:
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in _workloads()]
    for service in _docs("Service"):
        selector = service["spec"]["selector"]
        matched = [w for w, labels in pods if selector.items() <= labels.items()]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} workloads"
        containers = _containers(matched[0])
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(
                _port_number(c, target) in {p["containerPort"] for p in c.get("ports", [])}
                for c in containers if isinstance(target, int) or target in {p.get("name") for p in c.get("ports", [])}
            ), f"Service {service['metadata']['name']}: targetPort {target}"
    for workload in _workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_compose_health_checks_use_the_real_routes_and_ports() -> None:
    checked = set()
    for name, service in _compose()["services"].items():
        test = service.get("healthcheck", {}).get("test", [])
        urls = re.findall(r"https?://[^'\"\s)]+", " ".join(test))
        if not urls:
            continue
        argv = shlex.split(service["command"]) if isinstance(service.get("command"), str) else service.get("command")
        expected = _expected_paths(argv)
        assert expected is not None, f"{name}: unknown command {argv}"
        for url in urls:
            parts = urlsplit(url)
            assert parts.path in expected, f"compose {name}: {parts.path} is not one of {sorted(expected)}"
            assert parts.port == int(_cli_option(argv, "--port")), f"compose {name}: {url}"
        checked.add(name)
    assert {"recommender", "mlflow", "prefect"} <= checked
    recommender = _compose()["services"]["recommender"]
    assert "/readyz" in " ".join(recommender["healthcheck"]["test"])
    assert "replicas" in recommender["deploy"]  # scaled by RECOMMENDER_REPLICAS or --scale


# ---------------------------------------------------------------- MLflow, Prefect


def test_mlflow_runs_on_postgresql_with_an_object_store() -> None:
    (container,) = _containers(_doc("Deployment", "recloop-mlflow"))
    argv = _argv(container)
    assert argv[:2] == ["mlflow", "server"] and _cli_option(argv, "--app-name") == "basic-auth"
    assert _cli_option(argv, "--backend-store-uri").startswith("postgresql+psycopg://")
    destination = _cli_option(argv, "--artifacts-destination")
    assert destination.startswith("s3://")
    # recloop's own clients write to the same bucket (experiments' artifact locations)
    assert _doc("ConfigMap", "recloop-settings")["data"]["RECLOOP_MLFLOW_ARTIFACT_ROOT"] == destination
    env = {e["name"] for e in container["env"]}
    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    # every $(VAR) of the command is defined by the container's env (Kubernetes expands only those)
    assert set(re.findall(r"\$\(([A-Z_]+)\)", " ".join(argv))) <= env


def _prefect_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((INFRA / name).read_text())


def test_prefect_worker_serves_the_kubernetes_pool_of_the_k8s_deployments() -> None:
    worker = _doc("Deployment", "recloop-prefect-worker")
    (container,) = _containers(worker)
    argv = _argv(container)
    assert argv[:3] == ["prefect", "worker", "start"] and _cli_option(argv, "--type") == "kubernetes"
    pool = _cli_option(argv, "--pool")
    init_script = " ".join(" ".join(_argv(c)) for c in worker["spec"]["template"]["spec"]["initContainers"])
    assert f"work-pool create {pool} --type kubernetes" in init_script
    # the pool's job template hands the flow runs the same settings, secrets and volume as serving
    serving = _containers(_doc("Deployment", "recloop-serving"))[0]
    for ref in serving["envFrom"]:
        ((kind, target),) = ref.items()
        assert f'"{kind}": {{"name": "{target["name"]}"}}' in init_script, ref
    assert '"claimName": "recloop-data"' in init_script
    # RBAC: the worker's ServiceAccount may create Jobs and watch their Pods
    account = worker["spec"]["template"]["spec"]["serviceAccountName"]
    binding = next(b for b in _docs("RoleBinding") if any(s["name"] == account for s in b["subjects"]))
    rules = _doc("Role", binding["roleRef"]["name"])["rules"]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)

    assert allowed("batch", "jobs", "create") and allowed("batch", "jobs", "watch")
    assert allowed("", "pods", "watch") and allowed("", "pods/log", "get")
    # the deployments on that pool are infra/prefect.yaml's, flow for flow
    k8s, local = _prefect_file("prefect-k8s.yaml"), _prefect_file("prefect.yaml")
    assert k8s["prefect-version"] == local["prefect-version"]

    def shape(doc: dict[str, Any]) -> dict[str, Any]:
        return {d["name"]: (d["entrypoint"], d.get("schedules")) for d in doc["deployments"]}

    assert shape(k8s) == shape(local)
    for deployment in k8s["deployments"]:
        assert deployment["work_pool"]["name"] == pool
        assert deployment["work_pool"]["job_variables"]["image"] == serving["image"]
        module, flow = deployment["entrypoint"].split(":")
        assert f"def {flow}(" in (ROOT / module).read_text(), deployment["entrypoint"]
        if "start_service" in (ROOT / module).read_text():  # a Job never starts a server of its own
            assert deployment["parameters"]["start_service"] is False, deployment["name"]


def test_every_deployment_passes_only_parameters_its_flow_takes_and_tune_runs_by_hand_one_at_a_time() -> None:
    import importlib

    for name in ("prefect.yaml", "prefect-k8s.yaml"):
        deployments = {d["name"]: d for d in _prefect_file(name)["deployments"]}
        for deployment in deployments.values():
            module, flow = deployment["entrypoint"].split(":")
            fn = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), flow)
            fn.validate_parameters(deployment.get("parameters") or {})  # a misspelt name fails every run
        tune = deployments["recloop-tune"]  # the Optuna search: started from the UI, never on a schedule
        assert tune["entrypoint"] == "flows/tune.py:tune_flow" and not tune.get("schedules"), name
        assert not tune.get("triggers") and tune["concurrency_limit"]["limit"] == 1, name
        assert tune["parameters"] == {"source": "lake", "trials": 20}, name
