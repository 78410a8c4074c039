"""Tenant isolation over every route, generated from the app's own route table (a new route is covered, or
this test fails naming it), the admin role, key revocation, and server-owned fields in request bodies."""

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from shared.ids import new_id, now
from tests.support import SAMPLE, embedded_in_process, free_port

# Webhook endpoints on a loopback port nothing listens on: transitions made later try to deliver there.
HOOKS = f"http://127.0.0.1:{free_port()}/hooks"


@pytest.fixture
def world(tmp_path, monkeypatch, tiny_model):
    """Tenant A with one of everything (a file, a validating job, a succeeded job with an adapter, checkpoint
    and fine-tuned model, a webhook endpoint); tenant B with nothing; an admin of tenant `ops`."""
    embedded_in_process(monkeypatch, tmp_path / "data", tiny_model, webhook_allowed_networks="127.0.0.0/8")
    from api.app import create_app
    from shared.auth.service import create_key
    from shared.db import session_scope
    from shared.jobs.models import Checkpoint, Job
    from shared.storage import get_storage

    with session_scope() as session:
        key_a, secret_a = create_key(session, "tenant-a")
        _, secret_b = create_key(session, "tenant-b")
        _, secret_admin = create_key(session, "ops", admin=True)
    app = create_app()
    clients = {
        name: TestClient(app, headers={"Authorization": f"Bearer {secret}"})
        for name, secret in (("a", secret_a), ("b", secret_b), ("admin", secret_admin))
    }
    a = clients["a"]
    with open(SAMPLE / "train.jsonl", "rb") as stream:
        file_id = a.post("/v1/files", files={"file": ("train.jsonl", stream)}, data={"purpose": "fine-tune"}).json()[
            "id"
        ]
    body = {"model": "tiny-llama", "training_file": file_id, "suffix": "a"}
    job_id = a.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    done_id = a.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    adapter_key = f"tenants/tenant-a/jobs/{done_id}/attempt-1/adapter.zip"
    get_storage().put_bytes(adapter_key, b"PK-not-really-a-zip")
    get_storage().put_bytes(f"tenants/tenant-a/jobs/{done_id}/attempt-1/attempt.log", b"step 1\n")
    model = f"ft:tiny-llama:a:{done_id}"
    with session_scope() as session:
        job = session.get(Job, done_id)
        job.status, job.attempt, job.fine_tuned_model, job.finished_at = "succeeded", 1, model, now()
        job.adapter_key, job.adapter_sha256 = adapter_key, "0" * 64
        job.evaluation = {
            "created_at": now(), "validation_examples": 2, "improved": True, "samples": [],
            "base": {"loss": 2.0, "token_accuracy": 0.5},
            "tuned": {"loss": 1.0, "token_accuracy": 0.7, "selection": "best"},
        }  # fmt: skip
        checkpoint_id = new_id("ftckpt")
        session.add(
            Checkpoint(
                id=checkpoint_id, job_id=done_id, attempt=1, step=5, metrics={}, storage_key=adapter_key,
                sha256="0" * 64, created_at=now(),
            )
        )  # fmt: skip
    endpoint_id = a.post("/v1/webhooks", json={"url": f"{HOOKS}/a"}).json()["id"]
    export_id = a.post(f"/v1/fine_tuning/jobs/{done_id}/exports", json={"format": "adapter"}).json()["id"]
    ids = {
        "file_id": file_id,
        "job_id": done_id,
        "model_id": model,
        "endpoint_id": endpoint_id,
        "key_id": key_a.id,
        "checkpoint_id": checkpoint_id,
        "attempt": "1",
        "export_id": export_id,
    }
    yield clients, ids, job_id, app
    for client in clients.values():
        client.close()


# How tenant B tries each creating route against tenant A's objects, and what it must get.
CREATE_AS_B = {
    ("POST", "/v1/files"): (
        lambda ids: {
            "files": {"file": ("x.jsonl", (SAMPLE / "train.jsonl").read_bytes())},
            "data": {"purpose": "fine-tune"},
        },
        200,  # B's own file: nothing of A's involved
    ),
    ("POST", "/v1/fine_tuning/jobs"): (
        lambda ids: {"json": {"model": "tiny-llama", "training_file": ids["file_id"]}},
        404,
    ),
    ("POST", "/v1/webhooks"): (lambda ids: {"json": {"url": f"{HOOKS}/b"}}, 200),
    # A's fine-tuned model is not found for B, before any inference worker is looked for
    ("POST", "/v1/chat/completions"): (
        lambda ids: {"json": {"model": ids["model_id"], "messages": [{"role": "user", "content": "hi"}]}},
        404,
    ),
    ("POST", "/v1/completions"): (lambda ids: {"json": {"model": ids["model_id"], "prompt": "hi"}}, 404),
}


# A valid body for the routes on A's objects that need one: B's request must fail on the object, not the body.
BODIES = {("POST", "/v1/fine_tuning/jobs/{job_id}/exports"): {"format": "merged"}}


def walk(routes):
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # FastAPI keeps included routers nested
            yield from walk(route.original_router.routes)


def api_routes(app):
    routes = [r for r in walk(app.routes) if r.path not in ("/healthz", "/readyz") and not is_page(r.path)]
    documented = {p for p in app.openapi()["paths"] if p not in ("/healthz", "/readyz")}
    assert {r.path.replace(":path", "") for r in routes} == documented  # the walk found every route
    for route in routes:
        for method in sorted(route.methods):
            yield method, route.path, route.param_convertors


def is_page(path: str) -> bool:
    """The dashboard's routes (outside the OpenAPI document): `test_every_page_hides_tenant_a_from_tenant_b`."""
    return path == "/" or path == "/ui" or path.startswith("/ui/")


def fill(path: str, convertors: dict, ids: dict) -> str:
    for name in convertors:
        assert name in ids, f"route {path} has path parameter {name!r}: teach test_security which object to use"
        path = path.replace(f"{{{name}:path}}", ids[name]).replace(f"{{{name}}}", ids[name])
    return path


def test_every_route_hides_tenant_a_from_tenant_b(world):
    clients, ids, validating_job, app = world
    a, b = clients["a"], clients["b"]
    secrets = {v for k, v in ids.items() if k != "attempt"} | {validating_job}  # an attempt number is no secret
    covered = 0
    for method, template, convertors in api_routes(app):
        path = fill(template, convertors, ids)
        if template.startswith("/admin") or template == "/metrics":  # admin keys only
            for tenant_client in (a, b):
                response = tenant_client.request(method, path, json={} if method == "POST" else None)
                assert response.status_code == 403, (method, template, response.text)
                assert response.json()["error"]["code"] == "permission_denied"
        elif convertors:
            response = b.request(method, path, json=BODIES.get((method, template)))
            assert response.status_code == 404, (method, template, response.status_code, response.text)
            assert not secrets & set(response.text.split('"')) - {path.rsplit("/", 1)[-1], ids["model_id"]}
            if method == "GET":  # the control: the same request works for the owner
                assert a.request(method, path).status_code == 200, (template, a.request(method, path).text)
        elif method == "GET":
            response = b.get(path)
            assert response.status_code == 200, (template, response.text)
            leaked = [s for s in secrets if s in response.text]
            assert not leaked, f"{template} shows tenant A's {leaked} to tenant B"
        else:
            assert (method, template) in CREATE_AS_B, f"{method} {template}: add it to CREATE_AS_B"
            make, expected = CREATE_AS_B[(method, template)]
            response = b.request(method, path, **make(ids))
            assert response.status_code == expected, (template, response.text)
        covered += 1
    assert covered >= 20

    # Cursors and filters that name A's objects are 404s too, not a different page.
    assert b.get("/v1/fine_tuning/jobs", params={"after": validating_job}).status_code == 404
    assert b.get("/v1/files", params={"after": ids["file_id"]}).status_code == 404
    # A still has everything B tried to cancel, pause, delete or revoke.
    assert a.get(f"/v1/files/{ids['file_id']}").status_code == 200
    assert a.get(f"/v1/fine_tuning/jobs/{validating_job}").json()["status"] == "validating_files"
    assert a.get(f"/v1/models/{ids['model_id']}").status_code == 200
    assert [e["id"] for e in a.get("/v1/webhooks").json()["data"]] == [ids["endpoint_id"]]
    assert a.get("/v1/fine_tuning/jobs").status_code == 200  # A's key was not revoked


def signed_in(app, secret: str) -> tuple[TestClient, str]:
    """A browser-like client signed in to the dashboard with this key, and its session's CSRF token."""
    client = TestClient(app, follow_redirects=False)
    assert client.post("/ui/sign-in", data={"api_key": secret, "next": "/ui/jobs"}).status_code == 303
    page = client.get("/ui/jobs").text
    return client, page.split('data-csrf="', 1)[1].split('"', 1)[0]


def test_every_page_hides_tenant_a_from_tenant_b(world):
    """The dashboard's pages and forms, from the route table as above: another tenant's object is a 404 on a
    page and a form alike, admin pages are 403 for tenant keys, and a form without its CSRF token is 403."""
    clients, ids, validating_job, app = world
    secrets_ = {k: v for k, v in ids.items() if k not in ("attempt",)}
    a, a_csrf = signed_in(app, secret_of(clients["a"]))
    b, b_csrf = signed_in(app, secret_of(clients["b"]))
    ids = {**ids, "action": "cancel", "job_id": validating_job}
    covered = 0
    for route in walk(app.routes):
        if not is_page(route.path) or route.path.startswith("/ui/sign-") or route.path in ("/", "/ui", "/ui/"):
            continue
        path = fill(route.path, route.param_convertors, ids)
        for method in sorted(route.methods):
            form = {"csrf_token": b_csrf, "model_id": ids["model_id"], "tenant": "tenant-b"}
            response = b.request(method, path, data=form if method == "POST" else None)
            if route.path.startswith("/ui/admin"):
                assert response.status_code == 403, (method, route.path, response.status_code)
            elif route.param_convertors or route.path == "/ui/models/delete":
                assert response.status_code == 404, (method, route.path, response.status_code)
                if method == "GET":  # the control: the owner sees it
                    assert a.get(path).status_code == 200, route.path
            else:
                assert response.status_code == 200, (method, route.path, response.status_code)
                leaked = [name for name, value in secrets_.items() if value in response.text]
                assert not leaked, f"{route.path} shows tenant A's {leaked} to tenant B"
            covered += 1
    assert covered >= 14
    # Nothing of A's changed, and A's own form without the token is refused.
    assert clients["a"].get(f"/v1/fine_tuning/jobs/{validating_job}").json()["status"] == "validating_files"
    assert clients["a"].get(f"/v1/models/{ids['model_id']}").status_code == 200
    refused = a.post(f"/ui/jobs/{validating_job}/cancel", data={"csrf_token": b_csrf})
    assert refused.status_code == 403 and "CSRF" in refused.text
    assert a.post(f"/ui/jobs/{validating_job}/cancel", data={"csrf_token": a_csrf}).status_code == 303
    assert clients["a"].get(f"/v1/fine_tuning/jobs/{validating_job}").json()["status"] == "cancelled"


def secret_of(client: TestClient) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


def test_server_owned_fields_are_refused_or_ignored(world):
    clients, ids, _, _ = world
    b = clients["b"]
    with open(SAMPLE / "train.jsonl", "rb") as stream:
        own = b.post(
            "/v1/files", files={"file": ("t.jsonl", stream)}, data={"purpose": "fine-tune", "tenant": "tenant-a"}
        ).json()["id"]
    assert b.get(f"/v1/files/{own}").status_code == 200 and clients["a"].get(f"/v1/files/{own}").status_code == 404
    for field, value in (("tenant", "tenant-a"), ("status", "succeeded"), ("attempt", 7), ("fine_tuned_model", "x")):
        response = b.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": own, field: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    response = b.post("/v1/webhooks", json={"url": f"{HOOKS}/b", "tenant": "tenant-a"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tenant"
    # A training file of B's with a validation file of A's: still A's file is not found
    response = b.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": own, "validation_file": ids["file_id"]}
    )
    assert response.status_code == 404 and response.json()["error"]["param"] == "validation_file"


def test_admin_sees_and_acts_across_tenants_and_revocation_is_immediate(world):
    clients, ids, validating_job, _ = world
    admin, a = clients["admin"], clients["a"]
    listed = admin.get("/admin/jobs").json()["data"]
    assert {(j["id"], j["tenant"]) for j in listed} >= {(validating_job, "tenant-a"), (ids["job_id"], "tenant-a")}
    assert admin.get("/admin/jobs", params={"tenant": "tenant-b"}).json()["data"] == []
    assert admin.get("/v1/fine_tuning/jobs").json()["data"] == []  # /v1 stays scoped to the admin's own tenant
    tenants = {t["tenant"] for t in admin.get("/admin/tenants").json()["data"]}
    assert {"tenant-a", "tenant-b", "ops"} <= tenants

    assert admin.post(f"/admin/jobs/{validating_job}/cancel").json()["status"] == "cancelled"
    created = admin.post("/admin/keys", json={"tenant": "tenant-c", "name": "ci"}).json()
    assert created["secret"].startswith("tq-") and created["tenant"] == "tenant-c" and not created["admin"]
    listing = admin.get("/admin/keys").json()["data"]
    assert all("secret" not in k for k in listing) and created["id"] in {k["id"] for k in listing}
    assert created["secret"] not in admin.get("/admin/keys").text

    assert a.get("/v1/files").status_code == 200
    revoked = admin.delete(f"/admin/keys/{ids['key_id']}").json()
    assert revoked["revoked_at"] is not None
    response = a.get("/v1/files")  # the very next request
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer tq-not-a-key", "tq-no-scheme"],
)
def test_missing_or_bad_keys_get_401_everywhere_but_health(world, header):
    _, _, _, app = world
    client = TestClient(app)
    headers = {"Authorization": header} if header is not None else {}
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models", "/v1/webhooks", "/admin/overview"):
        response = client.get(path, headers=headers)
        assert response.status_code == 401, (path, header, response.text)
        assert (
            "Authorization: Bearer" in response.json()["error"]["message"]
            or "revoked" in response.json()["error"]["message"]
        )
    assert client.get("/healthz").status_code == 200


def test_model_folders_with_pickles_or_custom_code_are_refused(tmp_path, tiny_model):
    import json
    import shutil

    from shared.basemodels.service import describe_folder

    assert describe_folder(tiny_model)["parameters"] > 0
    pickled = shutil.copytree(tiny_model, tmp_path / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pytorch_model.bin.*no pickles or code"):
        describe_folder(pickled)
    custom = shutil.copytree(tiny_model, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.Evil"}}))
    with pytest.raises(ValueError, match="auto_map"):
        describe_folder(custom)


def test_storage_keys_never_leave_their_root(tmp_path):
    from shared.files.service import _safe_name, clean_filename
    from shared.storage import LocalStorage, StorageError

    assert clean_filename("../../etc/passwd") == "passwd" and clean_filename("a\x00b\n.jsonl") == "ab.jsonl"
    assert "/" not in _safe_name("../../x") and ".." not in _safe_name("../../x").split("/")
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageError):
        storage.put_bytes("../outside", b"x")
    assert not (tmp_path / "outside").exists()


def test_dev_makes_the_first_admin_key_once(tmp_path, monkeypatch, capsys):
    embedded_in_process(monkeypatch, tmp_path / "data")
    from shared.auth.service import authenticate, list_keys
    from shared.db import session_scope
    from tunequeue.commands import processes as cli

    cli.first_key()
    secret = capsys.readouterr().out.split()[-1]
    cli.first_key()  # a key exists now: nothing new, nothing printed
    assert capsys.readouterr().out == ""
    with session_scope() as session:
        assert len(list_keys(session)) == 1
        principal = authenticate(session, secret)
        assert principal is not None and principal.admin and principal.tenant == "default"
        stored = list_keys(session)[0]
        assert secret not in (stored.secret_sha256, stored.prefix) and stored.prefix == secret[:10]


def test_the_job_page_lists_and_asks_for_exports(world):
    """A succeeded job's page has the export form (the same service as the API) and lists its exports with
    their status and download link; the form refuses a choice it does not offer."""
    clients, ids, _, app = world
    a, csrf = signed_in(app, secret_of(clients["a"]))
    page = f"/ui/jobs/{ids['job_id']}"
    assert 'action="/ui/jobs/' in a.get(page).text and f"{ids['export_id']}" in a.get(page).text
    asked = a.post(f"{page}/exports", data={"csrf_token": csrf, "export": "gguf:q8_0"})
    assert asked.status_code == 303 and asked.headers["location"] == f"{page}#exports"
    listed = clients["a"].get(f"/v1/fine_tuning/jobs/{ids['job_id']}/exports").json()["data"]
    assert [(e["format"], e["quantization"], e["status"]) for e in listed][0] == ("gguf", "q8_0", "queued")
    shown = a.get(page).text
    assert listed[0]["id"] in shown and f"/exports/{ids['export_id']}/content" in shown
    assert a.post(f"{page}/exports", data={"csrf_token": csrf, "export": "gguf:q2_k"}).status_code == 400
