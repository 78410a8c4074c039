"""Small hardening, each with the request or command that used to go wrong: list filters and cursors that
answered 500 or told one tenant about another's objects, guessable event ids, errors without a message,
a readiness probe that named hosts, worker names in tenants' events, base model names that reached outside
the model store, file:// URLs with a host, keys that never expire, and keys minted or left behind."""

import argparse
import logging
import re
import shutil
from urllib.parse import quote

import pytest
from fastapi import Depends
from fastapi.testclient import TestClient

from shared.ids import new_id, now
from tests.support import SAMPLE, embedded_in_process, make_key


@pytest.fixture
def world(tmp_path, monkeypatch, tiny_model):
    """Tenants A and B with a job each (B's has a checkpoint), and an admin; clients that see 500s as responses."""
    embedded_in_process(monkeypatch, tmp_path / "data", tiny_model)
    from api.app import create_app

    app = create_app()
    keys = {"a": make_key("tenant-a"), "b": make_key("tenant-b"), "admin": make_key("ops", admin=True)}
    clients = {
        name: TestClient(app, headers={"Authorization": f"Bearer {key}"}, raise_server_exceptions=False)
        for name, key in keys.items()
    }
    jobs = {name: submit(clients[name]) for name in ("a", "b")}
    checkpoints = {name: add_checkpoint(jobs[name], step=5) for name in ("a", "b")}
    yield clients, jobs, checkpoints, app
    for client in clients.values():
        client.close()


def submit(client) -> str:
    with open(SAMPLE / "train.jsonl", "rb") as stream:
        response = client.post("/v1/files", files={"file": ("train.jsonl", stream)}, data={"purpose": "fine-tune"})
    body = {"model": "tiny-llama", "training_file": response.json()["id"]}
    return client.post("/v1/fine_tuning/jobs", json=body).json()["id"]


def add_checkpoint(job_id: str, step: int) -> str:
    from shared.db import session_scope
    from shared.jobs.models import Checkpoint

    checkpoint_id = new_id("ftckpt")
    with session_scope() as session:
        session.add(
            Checkpoint(
                id=checkpoint_id, job_id=job_id, attempt=1, step=step, metrics={}, storage_key=f"k/{checkpoint_id}",
                sha256="0" * 64, created_at=now(),
            )
        )  # fmt: skip
    return checkpoint_id


def assert_error(response, status: int, param: str | None, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


# (a) the metadata filter


@pytest.mark.parametrize("value", ['"abc"', "[1, 2]", '{"team": 1}', "{not json", "[" * 5000])
def test_a_metadata_filter_that_is_not_an_object_of_strings_is_a_400(world, value):
    clients, *_ = world
    response = clients["a"].get("/v1/fine_tuning/jobs", params={"metadata": value})
    assert_error(response, 400, "metadata", "JSON object of strings")


def test_a_metadata_filter_as_json_or_brackets_selects_jobs(world):
    clients, jobs, *_ = world
    a = clients["a"]
    assert a.get("/v1/fine_tuning/jobs", params={"metadata": '{"team": "ml"}'}).json()["data"] == []
    assert a.get("/v1/fine_tuning/jobs", params={"metadata[team]": "ml"}).json()["data"] == []
    assert [j["id"] for j in a.get("/v1/fine_tuning/jobs").json()["data"]] == [jobs["a"]]


# (b) cursors too large for an integer column


@pytest.mark.parametrize("cursor", ["ftevent-99999999999999999999999", "ftevent--1", "ftevent-1e9"])
def test_b_an_event_cursor_past_any_integer_is_a_404_naming_after(world, cursor):
    clients, jobs, *_ = world
    response = clients["a"].get(f"/v1/fine_tuning/jobs/{jobs['a']}/events", params={"after": cursor})
    assert_error(response, 404, "after", cursor)


def test_b_an_attempt_number_past_any_integer_is_a_404(world):
    clients, jobs, *_ = world
    response = clients["a"].get(f"/v1/fine_tuning/jobs/{jobs['a']}/attempts/99999999999999999999999/log")
    assert_error(response, 404, "attempt")


# (c) unexpected errors


def test_c_an_unexpected_error_is_openai_shaped_with_a_request_id_in_the_log(world, caplog):
    clients, jobs, _, app = world

    def broken_dependency():
        raise RuntimeError("secret detail of the dependency")

    @app.get("/boom/route")
    def boom_route():
        raise RuntimeError("secret detail of the route")

    @app.get("/boom/dependency", dependencies=[Depends(broken_dependency)])
    def boom_dependency():
        return {}

    @app.get("/boom/async")
    async def boom_async():
        raise KeyError("secret detail of an async route")

    for path in ("/boom/route", "/boom/dependency", "/boom/async"):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="tunequeue.api"):
            response = clients["a"].get(path)
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        request_id = response.headers["x-request-id"]
        assert re.fullmatch(r"req_[0-9a-f]{24}", request_id)
        assert response.json() == {
            "error": {
                "message": f"Internal error; quote request id {request_id} when reporting it",
                "type": "server_error",
                "param": None,
                "code": "server_error",
            }
        }
        assert "secret detail" not in response.text
        [record] = [r for r in caplog.records if request_id in r.getMessage()]
        assert record.exc_info is not None and "secret detail" in str(record.exc_info[1]), path


def test_c_every_response_carries_its_own_request_id(world):
    clients, jobs, *_ = world
    seen = {
        clients["a"].get("/healthz").headers["x-request-id"],
        clients["a"].get("/v1/fine_tuning/jobs/ftjob-nope").headers["x-request-id"],  # 404
        TestClient(world[3]).get("/v1/files").headers["x-request-id"],  # 401
        clients["a"].post("/v1/fine_tuning/jobs", content=b"x" * (2 << 20)).headers["x-request-id"],  # 413
    }
    assert len(seen) == 4 and all(s.startswith("req_") for s in seen)


# (d) cursors are looked up within the caller's own job and tenant


def test_d_a_cursor_of_another_tenant_answers_as_an_unknown_one(world):
    clients, jobs, checkpoints, _ = world
    b = clients["b"]

    def both(path: str, foreign: str, made_up: str) -> None:
        seen = b.get(path, params={"after": foreign})
        unknown = b.get(path, params={"after": made_up})
        assert seen.status_code == unknown.status_code == 404, (seen.text, unknown.text)
        assert seen.json()["error"]["param"] == unknown.json()["error"]["param"] == "after"
        assert seen.json()["error"]["code"] == unknown.json()["error"]["code"]
        assert seen.text.replace(foreign, "ID") == unknown.text.replace(made_up, "ID")

    made_up = new_id("ftckpt")
    both(f"/v1/fine_tuning/jobs/{jobs['b']}/checkpoints", checkpoints["a"], made_up)
    a_event = clients["a"].get(f"/v1/fine_tuning/jobs/{jobs['a']}/events").json()["data"][0]["id"]
    both(f"/v1/fine_tuning/jobs/{jobs['b']}/events", a_event, "ftevent-" + "0" * 24)
    both("/v1/fine_tuning/jobs", jobs["a"], new_id("ftjob"))
    # the control: B's own cursors page as before
    own = b.get(f"/v1/fine_tuning/jobs/{jobs['b']}/checkpoints", params={"after": checkpoints["b"]})
    assert own.status_code == 200 and own.json()["data"] == []


def test_d_checkpoints_page_by_step_within_the_job(world):
    clients, jobs, checkpoints, _ = world
    later = add_checkpoint(jobs["b"], step=10)
    path = f"/v1/fine_tuning/jobs/{jobs['b']}/checkpoints"
    first = clients["b"].get(path, params={"limit": 1}).json()
    assert [c["id"] for c in first["data"]] == [later] and first["has_more"] is True
    second = clients["b"].get(path, params={"limit": 1, "after": first["last_id"]}).json()
    assert [c["id"] for c in second["data"]] == [checkpoints["b"]] and second["has_more"] is False


# (e) event ids


def test_e_event_ids_are_random_and_page_in_order(world):
    clients, jobs, *_ = world
    a, path = clients["a"], f"/v1/fine_tuning/jobs/{jobs['a']}/events"
    a.post(f"/v1/fine_tuning/jobs/{jobs['a']}/cancel")  # a second event (and a third: the cancel itself)
    events = a.get(path).json()["data"]
    assert len(events) >= 2
    assert all(re.fullmatch(r"ftevent-[0-9a-f]{24}", e["id"]) for e in events), events
    paged, after = [], None
    while True:
        page = a.get(path, params={"limit": 1, **({"after": after} if after else {})}).json()
        paged += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [e["id"] for e in paged] == [e["id"] for e in events]
    for old_style in ("ftevent-1", "ftevent-2"):
        assert_error(a.get(path, params={"after": old_style}), 404, "after")


def test_e_every_event_row_gets_its_public_id(world):
    from sqlalchemy import func, select

    from shared.db import session_scope
    from shared.jobs.models import JobEvent

    with session_scope() as session:
        assert session.scalar(select(func.count()).where(JobEvent.public_id.is_(None))) == 0
        assert session.scalar(select(func.count()).select_from(JobEvent)) >= 2


# (f) readiness


def test_f_readiness_says_up_or_down_and_only_admins_see_why(world, tmp_path, caplog):
    clients, *_, app = world
    shutil.rmtree(tmp_path / "data" / "storage")  # the storage folder goes missing
    with caplog.at_level(logging.WARNING, logger="tunequeue.api"):
        for caller in (TestClient(app), clients["a"], TestClient(app, headers={"Authorization": "Bearer wrong"})):
            response = caller.get("/readyz")
            assert response.status_code == 503
            assert response.json() == {
                "status": "unavailable",
                "checks": {"database": "ok", "broker": "ok", "storage": "down"},
            }
        admin = clients["admin"].get("/readyz")
    assert admin.status_code == 503
    assert admin.json()["checks"]["storage"].startswith("error: StorageError: storage folder")
    assert str(tmp_path) in admin.text
    assert any(str(tmp_path / "data" / "storage") in r.getMessage() for r in caplog.records)


# (g) tenants' events say "worker lost", not which host and process


def test_g_a_lost_lease_is_told_to_the_tenant_without_the_worker_name(world, caplog):
    from shared.db import session_scope
    from shared.jobs.models import Job
    from shared.jobs.recovery import SweepReport, reap_expired_leases
    from shared.settings import get_settings

    clients, jobs, *_ = world
    with session_scope() as session:
        job = session.get(Job, jobs["a"])
        job.status, job.attempt, job.worker, job.lease_expires_at = "running", 1, "gpu-7.invalid:4242", now() - 60
    report = SweepReport()
    with caplog.at_level(logging.WARNING, logger="tunequeue.sweeper"):
        reap_expired_leases(get_settings(), report)
    assert report.requeued == [jobs["a"]]
    seen = clients["a"].get(f"/v1/fine_tuning/jobs/{jobs['a']}").text
    events = clients["a"].get(f"/v1/fine_tuning/jobs/{jobs['a']}/events").json()["data"]
    assert "worker lost" in events[0]["message"] and "requeued" in events[0]["message"]
    assert not any("gpu-7" in e["message"] for e in events) and "gpu-7" not in seen
    assert any("gpu-7.invalid:4242" in r.getMessage() for r in caplog.records)  # the operator's log keeps it


def test_g_a_checkpoint_that_fails_verification_is_told_without_its_storage_key(tmp_path, monkeypatch, caplog):
    from tests.unit.test_resume_fallback import outcome, runner, running_job

    embedded_in_process(monkeypatch, tmp_path / "data")
    candidates = running_job({2: False, 4: True})
    with caplog.at_level(logging.WARNING, logger="tunequeue.worker"):
        runner().fetch_resume_state(tmp_path, candidates)
    _, events = outcome()
    assert events[0] == "The checkpoint at step 4 failed verification; it is marked unusable"
    assert any(candidates[0].key in r.getMessage() for r in caplog.records)


# (h) base model names


@pytest.mark.parametrize("name", ["../escape", "/", "", ".", "..", "Fake/Model", "has space", "a:b", "x\n", "a" * 129])
def test_h_a_base_model_name_must_be_one_plain_path_component(name, tmp_path):
    from shared.basemodels.service import check_model_id, model_folder
    from shared.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="Invalid base model name"):
        check_model_id(name)
    with pytest.raises(InvalidRequest):
        model_folder(tmp_path / "models", name)


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "tiny-llama", "smollm2-135m-instruct", "qwen2.5_0.5b"])
def test_h_usual_model_names_are_accepted(name, tmp_path):
    from shared.basemodels.service import check_model_id, model_folder

    assert check_model_id(name) == name
    assert model_folder(tmp_path / "models", name) == tmp_path / "models" / name


@pytest.mark.parametrize("command", ["import-hf", "import-gguf"])
@pytest.mark.parametrize("name", ["../escape", "/", ""])
def test_h_the_cli_refuses_a_bad_model_name_before_writing_anything(
    tmp_path, monkeypatch, capsys, tiny_model, command, name
):
    from tunequeue.cli import main

    embedded_in_process(monkeypatch, tmp_path / "data")
    source = tiny_model if command == "import-hf" else tmp_path / "model.gguf"
    assert main(["models", command, str(source), "--name", name]) == 1
    err = capsys.readouterr().err
    assert f"Invalid base model name {name!r}" in err and "no '/'" in err
    assert not (tmp_path / "data" / "escape").exists() and not (tmp_path / "data" / "storage" / "escape").exists()
    assert not list((tmp_path / "data" / "storage").rglob("*.safetensors"))


# (i) file:// storage URLs


def test_i_a_file_url_with_a_host_is_refused_naming_the_setting(tmp_path):
    from shared.settings import InvalidSettings
    from shared.storage import storage_from_url

    with pytest.raises(InvalidSettings, match="TUNEQUEUE_STORAGE_URL.*host must be empty or localhost"):
        storage_from_url(f"file://fileserver.invalid{tmp_path}/storage")
    with pytest.raises(InvalidSettings, match="TUNEQUEUE_STORAGE_URL"):
        storage_from_url("file://relative/storage")  # "relative" would be read as a host


def test_i_a_file_url_is_percent_decoded_and_may_say_localhost(tmp_path):
    from shared.storage import LocalStorage, storage_from_url

    folder = tmp_path / "my data%"
    storage = storage_from_url("file://" + quote(str(folder)))
    assert isinstance(storage, LocalStorage) and storage.root == folder and folder.is_dir()
    assert storage_from_url(f"file://localhost{tmp_path}/x").root == tmp_path / "x"  # type: ignore[attr-defined]


# (j) key expiry


def test_j_an_expired_key_is_refused_saying_it_expired(world):
    from shared.auth.models import ApiKey
    from shared.auth.service import create_key
    from shared.db import session_scope

    clients, _, _, app = world
    with session_scope() as session:
        key, secret = create_key(session, "tenant-a", expires_in=3600)
        key_id = key.id
    client = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
    assert client.get("/v1/fine_tuning/jobs").status_code == 200
    with session_scope() as session:
        session.get(ApiKey, key_id).expires_at = now() - 1
    error = assert_error(client.get("/v1/fine_tuning/jobs"), 401, None, "expired at", "keys create")
    assert error["code"] == "api_key_expired"


@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600", 3600)])
def test_j_expiry_durations(text, seconds):
    from tunequeue.commands.keys import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0d", "1w", "-5", "d", "1.5h", ""])
def test_j_bad_expiry_durations_are_refused(text):
    from tunequeue.commands.keys import parse_duration
    from tunequeue.console import Refused

    with pytest.raises(Refused, match="--expires-in"):
        parse_duration(text)


def test_j_keys_made_to_expire_show_when_and_then_expired(tmp_path, monkeypatch, capsys):
    from shared.auth.models import ApiKey
    from shared.db import session_scope
    from tunequeue.commands.keys import run_keys

    embedded_in_process(monkeypatch, tmp_path / "data")
    create = argparse.Namespace(action="create", tenant="acme", admin=False, name=None, expires_in="2d")
    assert run_keys(create) == 0
    created = capsys.readouterr()
    assert created.out.startswith("tq-") and ", expires 20" in created.err
    run_keys(argparse.Namespace(action="list", tenant=None))
    header, row = capsys.readouterr().out.splitlines()
    assert "EXPIRES (UTC)" in header and row.split()[-1] == "active" and "never" not in row
    with session_scope() as session:
        for key in session.query(ApiKey):
            key.expires_at = now() - 5
    run_keys(argparse.Namespace(action="list", tenant=None))
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "expired"


# (k) `tunequeue dev` makes a key only on a fresh install


def test_k_dev_never_mints_a_key_once_any_key_was_made(tmp_path, monkeypatch, capsys):
    from shared.auth.service import list_keys, revoke_key
    from shared.db import session_scope
    from tunequeue.commands.processes import first_key

    embedded_in_process(monkeypatch, tmp_path / "data")
    first_key()
    assert "created an admin key" in capsys.readouterr().out
    with session_scope() as session:
        [key] = list_keys(session)
        revoke_key(session, key.id)
    first_key()
    out = capsys.readouterr().out
    assert "No API key is active" in out and "tunequeue keys create" in out and "tq-" not in out
    with session_scope() as session:
        assert len(list_keys(session)) == 1


# (l) the demo revokes its key


@pytest.mark.parametrize("ending", [None, KeyboardInterrupt, RuntimeError])
def test_l_the_demo_key_is_revoked_however_the_demo_ends(tmp_path, monkeypatch, ending):
    from shared.auth.service import authenticate, list_keys
    from shared.db import session_scope
    from tunequeue.demo import demo_key

    embedded_in_process(monkeypatch, tmp_path / "data")
    try:
        with demo_key() as secret:
            with session_scope() as session:
                assert authenticate(session, secret) is not None
            if ending is not None:
                raise ending()
    except (KeyboardInterrupt, RuntimeError):
        pass
    with session_scope() as session:
        assert authenticate(session, secret) is None
        [key] = list_keys(session)
        assert key.tenant == "demo" and key.revoked_at is not None
