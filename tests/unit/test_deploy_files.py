"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine); read them instead, so that they
stay consistent with the settings and commands that the code actually has."""

import re

import yaml

from shared.settings import Settings
from tests.support import ROOT
from tunequeue.cli import HANDLERS


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


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


def test_compose_environment_names_known_settings():
    env = compose()["services"]["api"]["environment"]
    known = {f"TUNEQUEUE_{field.upper()}" for field in Settings.model_fields}
    tunequeue_vars = {key for key in env if key.startswith("TUNEQUEUE_")}
    assert tunequeue_vars <= known, tunequeue_vars - known
    settings = Settings(
        **{key.removeprefix("TUNEQUEUE_").lower(): value for key, value in env.items() if key in tunequeue_vars}
    )
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert settings.resolved_broker_url.startswith("redis://")
    assert settings.resolved_storage_url.startswith("s3://")


def test_dockerfile_installs_torch_before_the_project():
    text = (ROOT / "Dockerfile").read_text()
    torch_at = text.index("torch==")
    project_at = text.index('pip install ".[worker]"')
    assert torch_at < project_at
    assert re.search(r'ENTRYPOINT \["tunequeue"\]', text)
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / path.rstrip("/")).exists(), path
