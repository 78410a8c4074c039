"""schemathesis against the app's own /openapi.json, with a real key, on Postgres + Redis + S3 (moto): every
default check (no server errors, declared status codes and content types, responses that match their
schema, schema-violating requests refused, schema-conforming ones accepted, ...) and the stateful phase
over the links schemathesis infers (create a file → read it, create a job → read, cancel, list its events)."""

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, not_a_server_error, positive_data_acceptance

from shared import db, queue, storage
from shared import settings as tq_settings

FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


from api.app import create_app  # noqa: E402

app = create_app()  # settings are read per request, so the fixture below decides where requests go
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
# The fixture's real key is the one sent; schemathesis would otherwise fill the declared bearer scheme with
# made-up tokens of its own in place of it.
schema.config.generation.update(with_security_parameters=False)


@pytest.fixture
def key_headers(production_env, monkeypatch, tiny_model):
    """A fresh Postgres database with the tiny model, one uploaded file, and a tenant key."""
    for key, value in production_env.items():
        monkeypatch.setenv(key, value)
    # The fuzzer registers webhooks at any host it makes up, and its jobs change state: their deliveries would
    # go beyond loopback from threads that outlive the test. Deliveries are tested in test_webhooks.py; here
    # they are recorded (the schema's part) and not sent.
    monkeypatch.setattr("shared.webhooks.service.dispatch", lambda delivery_ids: None)
    # ... so any address the fuzzer makes up may be registered (the destination check itself: test_webhook_guard).
    monkeypatch.setenv("TUNEQUEUE_WEBHOOK_ALLOWED_NETWORKS", "0.0.0.0/0,::/0")
    # Per-tenant caps make the same call answer differently once reached (201 then 429), which hypothesis reads
    # as a strategy that depends on outside state: they are tested where they are the subject.
    monkeypatch.setenv("TUNEQUEUE_WEBHOOK_MAX_ENDPOINTS_PER_TENANT", "1000000")
    monkeypatch.setenv("TUNEQUEUE_MAX_FILES_PER_TENANT", "1000000")
    # Jobs here never run (no worker): a generated `stream=true` would follow one until the stream's limit.
    monkeypatch.setenv("TUNEQUEUE_EVENT_STREAM_MAX_SECONDS", "0.5")
    for cached in (tq_settings.get_settings, db.get_engine, db.get_sessionmaker, storage.get_storage, queue.get_celery):
        cached.cache_clear()
    from shared import migrate
    from shared.auth.service import create_key
    from shared.db import session_scope
    from tests.support import SAMPLE
    from tunequeue.commands import models as cli

    migrate.upgrade()
    cli.register_folder(tiny_model, "tiny-llama", source="test")
    with session_scope() as session:
        _, secret = create_key(session, "fuzz", admin=True)  # reaches every route, /admin included
    headers = {"Authorization": f"Bearer {secret}"}
    from fastapi.testclient import TestClient

    with TestClient(app, headers=headers) as client, open(SAMPLE / "train.jsonl", "rb") as stream:
        # one real file so that generated job bodies can name something that exists
        client.post("/v1/files", files={"file": ("train.jsonl", stream)}, data={"purpose": "fine-tune"})
    return headers


@schema.parametrize()
@FAST
def test_api_conforms_to_its_schema(case, key_headers):
    excluded = []
    if case.method == "POST" and case.operation.path == "/v1/files":
        # An uploaded file is "any bytes" to the schema, but only JSONL examples are accepted: neither "any bytes
        # must be accepted" nor "non-bytes must be refused" applies to the file part.
        excluded = [negative_data_rejection, positive_data_acceptance]
    elif case.method == "POST" and case.operation.path == "/v1/fine_tuning/jobs":
        # Which base models exist and which modules they have is data, not schema: a well-formed body naming a
        # model that is not imported gets OpenAI's 400 model_not_available. Malformed bodies are still checked.
        excluded = [positive_data_acceptance]
    elif case.method == "POST" and case.operation.path == "/v1/webhooks":
        # Likewise a URL's destination: a well-formed string that is no valid URL, or whose host is an internal
        # address, is a 400 naming `url` (tests/unit/test_webhook_guard.py).
        excluded = [positive_data_acceptance]
    elif case.method == "POST" and case.operation.path in COMPLETIONS:
        excluded = [positive_data_acceptance, not_a_server_error]  # checked by `no_worker_is_the_only_5xx`
    response = case.call_and_validate(headers=key_headers, excluded_checks=excluded)
    assert response.status_code != 401, response.text  # the key really is sent
    no_worker_is_the_only_5xx(case, response)


# No inference worker runs here: a well-formed completion request is a documented 503 naming the command that
# starts one (tests/integration/test_inference.py has workers). Any other 5xx still fails.
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


def no_worker_is_the_only_5xx(case, response) -> None:
    if case.operation.path in COMPLETIONS and response.status_code >= 500:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "no_inference_worker", response.text


CURRENT: dict[str, dict] = {}


@pytest.fixture
def stateful_headers(key_headers):
    CURRENT["headers"], CURRENT["calls"], CURRENT["keep"] = key_headers, [], kept_rows()
    yield
    calls = CURRENT["calls"]
    CURRENT.clear()
    # the workflow really chained requests: ids created by one call were used by later ones
    real_id = re.compile(r"/(key|file|ftjob|wh)-[0-9a-f]{24}")
    chained = [(m, p) for m, p, status in calls if real_id.search(p) and status < 400]
    assert chained, calls[:60]
    print(f"\nstateful: {len(calls)} calls, {len(chained)} on objects created earlier in the sequence")


def kept_rows() -> dict[str, set[str]]:
    """What the fixture made (its key, its file): every scenario starts from these and nothing else."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import ApiKey, File

    with session_scope() as session:
        return {"keys": set(session.scalars(select(ApiKey.id))), "files": set(session.scalars(select(File.id)))}


def reset_rows(keep: dict[str, set[str]]) -> None:
    """Back to the fixture's rows. Hypothesis replays a scenario's choices and expects the same draws: a list
    that grew with the files, jobs, endpoints or keys of earlier scenarios would draw differently."""
    from sqlalchemy import delete

    from shared.db import session_scope
    from shared.models import ApiKey, File, IdempotencyKey, Job, WebhookEndpoint

    with session_scope() as session:
        for model in (Job, WebhookEndpoint, IdempotencyKey):  # events, checkpoints, deliveries: by cascade
            session.execute(delete(model))
        session.execute(delete(File).where(File.id.not_in(keep["files"])))
        session.execute(delete(ApiKey).where(ApiKey.id.not_in(keep["keys"])))


class APIWorkflow(schema.as_state_machine()):  # type: ignore[misc]
    """Sequences through the links schemathesis infers from the spec (an id a response returns, used by the
    next request): e.g. create a file → retrieve/delete it; create a job → retrieve, cancel, events."""

    def setup(self):
        reset_rows(CURRENT["keep"])

    def get_call_kwargs(self, case):
        return {"headers": CURRENT["headers"]}

    def validate_response(self, response, case, **kwargs):
        CURRENT["calls"].append((case.method, case.formatted_path, response.status_code))
        excluded = []
        if case.method == "POST" and case.operation.path in ("/v1/files", "/v1/fine_tuning/jobs"):
            excluded = [negative_data_rejection, positive_data_acceptance]  # see the test above
        elif case.method == "POST" and case.operation.path == "/v1/webhooks":
            excluded = [positive_data_acceptance]
        elif case.method == "POST" and case.operation.path in COMPLETIONS:
            excluded = [positive_data_acceptance, not_a_server_error]
        case.validate_response(response, excluded_checks=excluded)
        no_worker_is_the_only_5xx(case, response)


APIWorkflow.TestCase.settings = settings(FAST, max_examples=40, stateful_step_count=8)


@pytest.mark.usefixtures("stateful_headers")
class TestAPIWorkflow(APIWorkflow.TestCase):
    pass
