"""The API's own pages work with no network, declare the bearer key, and readiness includes the schema."""

import re

from fastapi.testclient import TestClient


def test_docs_pages_load_their_assets_from_this_server(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path))
    from api.app import create_app

    with TestClient(create_app()) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page)
            assert html.status_code == 200
            assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", html.text)
            assert assets and all(url.startswith("/") for url in assets), assets  # nothing from a CDN
            for url in assets:
                assert client.get(url).status_code == 200, url


def test_openapi_declares_the_bearer_scheme_on_keyed_routes(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path))
    from api.app import create_app

    schema = TestClient(create_app()).get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert schema["paths"]["/v1/fine_tuning/jobs"]["post"]["security"] == [{"bearerAuth": []}]
    assert schema["paths"]["/admin/overview"]["get"]["security"] == [{"bearerAuth": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_readiness_says_to_migrate_an_empty_database(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path))
    for key in ("TUNEQUEUE_DATABASE_URL", "TUNEQUEUE_BROKER_URL", "TUNEQUEUE_STORAGE_URL"):
        monkeypatch.delenv(key, raising=False)
    from api.app import create_app
    from shared import migrate

    client = TestClient(create_app())
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "down"  # no key: up or down only
    assert "run `tunequeue db upgrade`" in caplog.text  # the reason, for the operator
    migrate.upgrade()
    checks = dict.fromkeys(["database", "broker", "storage"], "ok")
    assert client.get("/readyz").json() == {"status": "ok", "checks": checks}
