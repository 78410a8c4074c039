"""`GET /v1/fine_tuning/jobs/{id}/events?stream=true`: a job's events as server-sent events, on the real stack
(API and worker as processes, Postgres, Redis, S3): the whole job followed live, a resume with Last-Event-ID,
and the errors, while the default JSON page stays what the OpenAI SDK reads."""

import json

import httpx

from tests.support import chat, write_jsonl


def frames(response: httpx.Response):
    """(event, id, data) of each frame, as an EventSource parses them; comments and `retry` skipped."""
    event, event_id, data = None, None, []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event or "message", event_id, json.loads("\n".join(data))
            event, event_id, data = None, None, []
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("id: "):
            event_id = line[4:]


def stream(stack, job_id: str, headers: dict | None = None) -> list[tuple]:
    with stack.client.stream(
        "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}, headers=headers, timeout=300
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(frames(response))


def test_a_job_followed_live_and_resumed_with_last_event_id(production_env, make_stack, tiny_model, tmp_path):
    stack = make_stack(production_env, tiny_model)
    records = [chat(f"Tell me about item {i}", f"Squawk! Item {i}.") for i in range(40)]
    training = stack.upload(write_jsonl(tmp_path / "train.jsonl", records))
    job = stack.create_job(model="tiny-llama", training_file=training["id"], hyperparameters={"n_epochs": 1})

    received = stream(stack, job["id"])  # from the job's first event until its end, while it runs

    kinds = [kind for kind, _, _ in received]
    assert kinds[0] == "job" and kinds[-1] == "end" and kinds.count("end") == 1
    assert received[-1][2]["status"] == "succeeded" and received[-1][2]["id"] == job["id"]
    statuses = [data["status"] for kind, _, data in received if kind == "job"]
    assert "running" in statuses and statuses[-1] == "succeeded"
    events = [(event_id, data) for kind, event_id, data in received if kind == "message"]
    paged = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000})
    assert paged.headers["content-type"] == "application/json"  # the default answer is unchanged
    assert [event_id for event_id, _ in events] == [e["id"] for e in reversed(paged.json()["data"])]
    assert all(data["id"] == event_id and data["object"] == "fine_tuning.job.event" for event_id, data in events)
    steps = [data["data"]["step"] for _, data in events if data["type"] == "metrics"]
    assert len(steps) >= 2 and steps == sorted(steps)

    middle = len(events) // 2
    resumed = stream(stack, job["id"], {"Last-Event-ID": events[middle][0]})
    assert [event_id for kind, event_id, _ in resumed if kind == "message"] == [e for e, _ in events[middle + 1 :]]
    assert resumed[-1][0] == "end"

    unknown = stack.client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true", headers={"Last-Event-ID": "ftevent-nope"}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "Last-Event-ID"
    other_tenant = {"Authorization": f"Bearer {stack.create_key('other')}"}
    hidden = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true", headers=other_tenant)
    assert hidden.status_code == 404
    assert httpx.get(f"{stack.client.base_url}/v1/fine_tuning/jobs/{job['id']}/events?stream=true").status_code == 401
