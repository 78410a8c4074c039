"""Storage quotas on a real (SQLite) database and the local object store: what a tenant holds (each stored
object once), the refusals that name their setting, the sizes the worker records, and deleting a fine-tuned
model deleting every object of its job."""

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared.ids import new_id, now
from shared.jobs import state
from tests.stored_jobs import add_checkpoint, add_job, deliver_adapter, job_prefix
from tests.support import embedded_in_process, make_key


def add_file(tenant: str, size: int, deleted: bool = False, purpose: str = "fine-tune") -> str:
    from shared.db import session_scope
    from shared.files.models import File
    from shared.storage import get_storage

    file_id = new_id("file")
    key = f"tenants/{tenant}/files/{file_id}/data.jsonl"
    if not deleted:
        get_storage().put_bytes(key, b"x" * size)
    with session_scope() as session:
        session.add(
            File(
                id=file_id, tenant=tenant, filename="data.jsonl", purpose=purpose, bytes=size, sha256="0" * 64,
                storage_key=key, created_at=now(), deleted=deleted,
            )
        )  # fmt: skip
    return file_id


def usage(tenant: str):
    from shared.db import session_scope
    from shared.quotas import usage

    with session_scope() as session:
        return usage(session, tenant)


def refusal(check, *args):
    """The error `check` raises in a transaction of its own."""
    from shared.db import session_scope
    from shared.errors import TunequeueError

    with pytest.raises(TunequeueError) as refused, session_scope() as session:
        check(session, *args)
    return refused.value


@pytest.fixture
def tenant_with_a_model(tmp_path, monkeypatch):
    """Tenant `a`: a live file (300 bytes) and a deleted one, a succeeded job with two checkpoints (2 × 100
    bytes) and its adapter (1000 bytes, also named by the adapter's checkpoint row). Tenant `b`: a file."""
    embedded_in_process(monkeypatch, tmp_path / "data", storage_quota_bytes="2000", max_files_per_tenant="3")
    add_file("a", 300)
    add_file("a", 5000, deleted=True)
    job_id = add_job("a")
    add_checkpoint(job_id, 1)
    add_checkpoint(job_id, 2)
    deliver_adapter(job_id, 3)
    add_file("b", 700)
    return job_id


def test_usage_counts_live_files_checkpoints_and_adapters_once(tenant_with_a_model):
    from shared.db import session_scope
    from shared.quotas import Usage, usage_by_tenant

    assert usage("a") == Usage(bytes=300 + 2 * 100 + 1000, files=1)
    assert usage("nobody") == Usage(bytes=0, files=0)
    with session_scope() as session:
        assert usage_by_tenant(session) == {"a": Usage(1500, 1), "b": Usage(700, 1)}


def test_check_upload_refuses_past_the_quota_or_the_file_count(tenant_with_a_model, monkeypatch):
    from shared import settings
    from shared.db import session_scope
    from shared.quotas import check_upload

    with session_scope() as session:
        check_upload(session, "a", 500)  # exactly up to the quota of 2000
    over = refusal(check_upload, "a", 501)
    assert over.status_code == 413 and over.code == "storage_quota_exceeded"
    assert "TUNEQUEUE_STORAGE_QUOTA_BYTES" in over.message and over.param == "file"

    add_file("a", 1)
    add_file("a", 1)
    settings.get_settings.cache_clear()
    too_many = refusal(check_upload, "a", 1)
    assert too_many.status_code == 429 and "TUNEQUEUE_MAX_FILES_PER_TENANT=3" in too_many.message
    monkeypatch.setenv("TUNEQUEUE_MAX_FILES_PER_TENANT", "4")
    settings.get_settings.cache_clear()
    with session_scope() as session:
        check_upload(session, "a", 1)


def test_check_room_refuses_a_tenant_at_its_quota(tenant_with_a_model):
    from shared.db import session_scope
    from shared.quotas import check_room

    with session_scope() as session:
        check_room(session, "a")  # 1500 of 2000
    add_file("a", 500)
    full = refusal(check_room, "a")
    assert full.status_code == 413 and "TUNEQUEUE_STORAGE_QUOTA_BYTES" in full.message
    assert "2000 bytes" in full.message and "delete files or fine-tuned models" in full.message
    with session_scope() as session:
        check_room(session, "b")  # another tenant is not affected


def test_deleting_a_fine_tuned_model_deletes_every_object_of_its_job(tenant_with_a_model):
    from api.app import create_app
    from shared.db import session_scope
    from shared.jobs.models import Checkpoint, Job
    from shared.storage import get_storage

    job_id, storage = tenant_with_a_model, get_storage()
    saved_state = add_checkpoint(job_id, 2, name="saved-at-step")  # a pause's saved state, named by the job
    storage.put_bytes(f"{job_prefix('a', job_id)}attempt-1/attempt.log", b"step 1\n")
    results = add_file("a", 40, purpose="fine-tune-results")
    other = add_job("a")
    other_key = deliver_adapter(other, 3)
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.resume_key, job.resume_sha256, job.result_files = saved_state, "0" * 64, [results]
    before = usage("a")
    assert before.bytes == 300 + 3 * 100 + 1000 + 40 + 1000

    model = f"ft:tiny-llama::{job_id}"
    with TestClient(create_app(), headers={"Authorization": f"Bearer {make_key('a')}"}) as client:
        response = client.delete(f"/v1/models/{model}")
        assert response.status_code == 200, response.text
        assert response.json() == {"id": model, "object": "model", "deleted": True}
        assert model not in {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert client.get(f"/v1/files/{results}").status_code == 200  # the tenant's file, deleted on its own
        assert client.delete(f"/v1/models/{model}").status_code == 404

    assert storage.list_keys(job_prefix("a", job_id)) == []
    assert storage.exists(other_key)  # another job of the tenant keeps its own
    with session_scope() as session:
        assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all() == []
        job = session.get(Job, job_id)
        assert job.resume_key is None and job.model_deleted_at is not None
    assert usage("a").bytes == before.bytes - 3 * 100 - 1000


def test_promotion_records_the_size_of_each_stored_object(tmp_path, monkeypatch):
    """The worker's fenced promotion writes each object's size on its row: checkpoints, the adapter, the result
    files (the metrics, and the evaluation, also stored on the job)."""
    from shared.db import session_scope
    from shared.files.models import File
    from shared.jobs.models import Checkpoint, Job
    from shared.storage import get_storage
    from worker.runner.promotion import Promotion
    from worker.training.events import DoneEvent

    embedded_in_process(monkeypatch, tmp_path / "data")
    job_id, storage = add_job("a", status=state.RUNNING, attempt=1), get_storage()
    promotion = Promotion(job_id, 1, "a", storage, tries=1)
    key = f"{promotion.prefix}/checkpoints/step-2.zip"
    assert promotion.checkpoint(2, {}, b"c" * 123, key) is not None
    adapter = Path(tmp_path / "adapter")
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (adapter / "adapter_model.safetensors").write_bytes(b"w" * 4096)
    evaluation = {
        "created_at": 1, "validation_examples": 2, "improved": True, "max_new_tokens": 64,
        "base": {"loss": 2.0, "token_accuracy": 0.5},
        "tuned": {"loss": 1.0, "token_accuracy": 0.7, "selection": "last"},
        "samples": [{"prompt": "Say 1", "reference": "Squawk!", "base": "1", "tuned": "Squawk!"}],
    }  # fmt: skip
    (tmp_path / "evaluation.json").write_text(json.dumps(evaluation))
    done = DoneEvent(
        adapter=str(adapter), trained_tokens=10, metrics={"step": 4}, evaluation=str(tmp_path / "evaluation.json")
    )
    promotion.adapter(done, [{"step": 4}])

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == state.SUCCEEDED and job.evaluation == evaluation
        stored_adapter = len(storage.get_bytes(job.adapter_key))
        assert job.adapter_bytes == stored_adapter > 0
        rows = session.execute(select(Checkpoint.storage_key, Checkpoint.bytes).where(Checkpoint.job_id == job_id))
        sizes = {stored: size for stored, size in rows}
        assert sizes == {key: 123, job.adapter_key: stored_adapter}
        files = [session.get(File, file_id) for file_id in job.result_files]
        shown = json.loads(storage.get_bytes(files[1].storage_key))
        assert shown["object"] == "fine_tuning.job.evaluation" and shown["samples"] == evaluation["samples"]
        result_bytes = sum(file.bytes for file in files)
    results = usage("a")
    assert results.files == 2  # the results files: the metrics CSV and the evaluation JSON
    # the checkpoint, the adapter once, and the result files
    assert results.bytes == 123 + stored_adapter + result_bytes
