"""Idempotency-Key on the creating POSTs, against the real API on Postgres: a retried request gets the original
response, 50 concurrent ones create one job, and a reused key with another body is refused."""

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support import SAMPLE


def test_jobs_sequential_concurrent_and_conflicting(production_env, make_stack, tiny_model):
    stack = make_stack(production_env, tiny_model, worker=False)
    file_id = stack.upload(SAMPLE / "train.jsonl")["id"]
    body = {"model": "tiny-llama", "training_file": file_id, "seed": 1}

    def post(key: str, payload: dict) -> httpx.Response:
        with httpx.Client(base_url=stack.client.base_url, headers=stack.client.headers, timeout=60) as client:
            return client.post("/v1/fine_tuning/jobs", json=payload, headers={"Idempotency-Key": key})

    first, again = post("key-1", body), post("key-1", body)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()

    other = post("key-1", {**body, "seed": 2})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused" and "key-1" in other.json()["error"]["message"]

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: post("key-burst", body), range(50)))
    assert [r.status_code for r in responses] == [200] * 50, {r.text for r in responses if r.status_code != 200}
    assert len({r.json()["id"] for r in responses}) == 1

    jobs = stack.client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    assert sorted(j["id"] for j in jobs) == sorted({first.json()["id"], responses[0].json()["id"]})
    assert stack.client.post("/v1/fine_tuning/jobs", json=body).json()["id"] not in {j["id"] for j in jobs}


def test_files(production_env, make_stack, tiny_model):
    stack = make_stack(production_env, tiny_model, worker=False)
    data = (SAMPLE / "train.jsonl").read_bytes()

    def upload(content: bytes, key: str) -> httpx.Response:
        return stack.client.post(
            "/v1/files",
            files={"file": ("train.jsonl", content)},
            data={"purpose": "fine-tune"},
            headers={"Idempotency-Key": key},
        )

    first, again = upload(data, "f-1"), upload(data, "f-1")
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    assert upload(data.replace(b"Squawk", b"Tweet"), "f-1").status_code == 409
    assert len(stack.client.get("/v1/files").json()["data"]) == 1
