"""Several workers (separate "nodes" with their own slots) on one broker and database: every job runs exactly
once, no device slot is ever held by two jobs at once, routing refuses what no worker can run, and the broker
starts higher-priority jobs first."""

from sqlalchemy import create_engine, text

from tests.faults import wait_for
from tests.support import chat, extract_zip, write_jsonl

SCALE_ENV = {
    "TUNEQUEUE_SWEEP_SECONDS": "1",
    "TUNEQUEUE_REPUBLISH_AFTER_SECONDS": "3",
    "TUNEQUEUE_SLOT_WAIT_SECONDS": "0.5",
    "TUNEQUEUE_HEARTBEAT_SECONDS": "1",
}


def data(tmp_path):
    return write_jsonl(tmp_path / "t.jsonl", [chat(f"Item {i}?", f"Squawk {i}!") for i in range(16)])


def usage(env) -> list[dict]:
    engine = create_engine(env["TUNEQUEUE_DATABASE_URL"])
    with engine.connect() as connection:
        rows = [
            dict(r) for r in connection.execute(text("SELECT * FROM device_usage ORDER BY started_at_ms")).mappings()
        ]
    engine.dispose()
    return rows


def one_node(make_stack, env: dict, tiny_model, slots: str):
    """A stack with one worker of `slots` CPU slots, registered (submissions are checked against it)."""
    stack = make_stack(env, tiny_model, worker=False)
    stack.start_worker("node", "--cpu-slots", slots)
    stack.wait_for_workers(1)
    return stack


def test_several_workers_share_jobs_and_never_overcommit_a_slot(production_env, make_stack, tiny_model, tmp_path):
    env = {**production_env, **SCALE_ENV}
    stack = make_stack(env, tiny_model, worker=False)
    for name, slots in (("node-a", "2"), ("node-b", "1"), ("node-c", "1")):
        stack.start_worker(name, "--cpu-slots", slots)
    workers = stack.wait_for_workers(3)
    assert sorted(w["slots"]["total"] for w in workers) == [1, 1, 2]

    file_id = stack.upload(data(tmp_path))["id"]
    body = {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 3, "batch_size": 4}}
    refused = stack.client.post("/v1/fine_tuning/jobs", json={**body, "resources": {"devices": 4}})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_capable_worker"
    assert "the largest has 2" in refused.json()["error"]["message"]

    job_ids = [stack.create_job(**body)["id"] for _ in range(8)]  # 8 jobs for 4 slots
    jobs = [stack.wait(job_id, timeout=400) for job_id in job_ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 8, stack.logs()

    rows = usage(env)
    assert sorted(r["job_id"] for r in rows) == sorted(job_ids)  # each job ran exactly once...
    assert all(r["attempt"] == 1 and r["ended_at_ms"] for r in rows)  # ...on its first attempt
    by_slot: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for r in rows:
        by_slot.setdefault((r["worker"], r["device"]), []).append((r["started_at_ms"], r["ended_at_ms"]))
    for slot, intervals in by_slot.items():
        intervals.sort()
        for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
            assert start >= end, f"slot {slot} held by two jobs at once: {intervals}"
    assert len({worker for worker, _ in by_slot}) == 3  # every node worked
    two_slot = [r for r in rows if r["device"] == "cpu:1"]
    assert two_slot, "node-a never used its second slot"
    schedule = "\n".join(
        f"  {r['job_id'][-6:]} {r['worker'].split(':')[-1]:>7} {r['device']} "
        f"{(r['started_at_ms'] - rows[0]['started_at_ms']) / 1000:6.1f}s → "
        f"{(r['ended_at_ms'] - rows[0]['started_at_ms']) / 1000:6.1f}s"
        for r in rows
    )
    print(f"\nschedule (job, worker pid, slot, start → end):\n{schedule}")


def test_priorities_order_start_times(production_env, make_stack, tiny_model, tmp_path):
    env = {**production_env, **SCALE_ENV}
    stack = one_node(make_stack, env, tiny_model, "1")
    file_id = stack.upload(data(tmp_path))["id"]
    body = {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 1, "batch_size": 8}}
    blocker = stack.create_job(**{**body, "hyperparameters": {"n_epochs": 8, "batch_size": 4}})["id"]
    wait_for(
        lambda: stack.client.get(f"/v1/fine_tuning/jobs/{blocker}").json()["status"] == "running", 120, "the blocker"
    )

    tenant = stack.create_key("tenant-x")
    too_high = stack.client.post(
        "/v1/fine_tuning/jobs", json={**body, "priority": 7}, headers={"Authorization": f"Bearer {tenant}"}
    )
    assert too_high.status_code == 400 and too_high.json()["error"]["param"] == "priority"

    by_priority = {p: stack.create_job(**body, priority=p)["id"] for p in (1, 9, 3, 7)}  # admin key: any priority
    assert stack.client.get(f"/v1/fine_tuning/jobs/{by_priority[9]}").json()["priority"] == 9
    for job_id in [blocker, *by_priority.values()]:
        assert stack.wait(job_id, timeout=400)["status"] == "succeeded", stack.logs()
    started = {r["job_id"]: r["started_at_ms"] for r in usage(env)}
    order = sorted(by_priority, key=lambda p: started[by_priority[p]])
    assert order == [9, 7, 3, 1], order
    assert started[blocker] < min(started[j] for j in by_priority.values())


def test_tenants_take_turns_within_a_priority(production_env, make_stack, tiny_model, tmp_path):
    env = {**production_env, **SCALE_ENV}
    stack = one_node(make_stack, env, tiny_model, "1")
    keys = {tenant: {"Authorization": f"Bearer {stack.create_key(tenant)}"} for tenant in ("big", "small")}

    def submit(tenant: str) -> str:
        with open(data(tmp_path), "rb") as stream:
            file_id = stack.client.post(
                "/v1/files", files={"file": ("t.jsonl", stream)}, data={"purpose": "fine-tune"}, headers=keys[tenant]
            ).json()["id"]
        body = {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 1, "batch_size": 8}}
        response = stack.client.post("/v1/fine_tuning/jobs", json=body, headers=keys[tenant])
        assert response.status_code == 200, response.text
        return response.json()["id"]

    big = [submit("big") for _ in range(4)]
    small = submit("small")  # one job, after the other tenant's four
    for job_id, tenant in [*((j, "big") for j in big), (small, "small")]:
        assert stack.wait(job_id, timeout=400, headers=keys[tenant])["status"] == "succeeded", stack.logs()
    started = {r["job_id"]: r["started_at_ms"] for r in usage(env)}
    order = sorted([*big, small], key=started.get)
    assert order.index(small) == 1, f"the small tenant's job started {order.index(small) + 1}th of 5"


def test_a_job_on_two_devices_trains_with_deepspeed(production_env, make_stack, tiny_model, tmp_path):
    env = {**production_env, **SCALE_ENV, "TUNEQUEUE_ZERO3_PERSISTENCE_THRESHOLD": "0"}  # LoRA weights partitioned
    stack = one_node(make_stack, env, tiny_model, "2")
    file_id = stack.upload(data(tmp_path))["id"]
    # 16 examples in batches of 5: each epoch ends on a batch of one, which one of the two ranks has no share of.
    body = {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 2, "batch_size": 5}}
    job = stack.create_job(**body, resources={"devices": 2}, deepspeed_stage=3)
    assert job["resources"] == {"devices": 2} and job["training_options"]["deepspeed_stage"] == 3
    done = stack.wait(job["id"], timeout=400)
    assert done["status"] == "succeeded", (done["error"], stack.logs())
    rows = [r for r in usage(env) if r["job_id"] == job["id"]]
    assert sorted(r["device"] for r in rows) == ["cpu:0", "cpu:1"]  # both slots, one job
    adapter = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
    assert adapter.status_code == 200
    assert_gathered_adapter(extract_zip(adapter.content, tmp_path / "adapter"))


def assert_gathered_adapter(folder) -> None:
    """The ZeRO-3 adapter holds whole LoRA matrices gathered from the ranks, trained: a gather that saved each
    rank's partition (empty or partial tensors) or the untrained weights fails here."""
    import json

    from safetensors.torch import load_file

    r = json.loads((folder / "adapter_config.json").read_text())["r"]
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors and all(t.isfinite().all() for t in tensors.values())
    for name, tensor in tensors.items():
        assert tensor.dim() == 2 and min(tensor.shape) > 0, (name, tensor.shape)
        assert tensor.shape[0 if "lora_A" in name else 1] == r, (name, tensor.shape, r)
        if "lora_B" in name:  # B starts at zero
            assert tensor.abs().max() > 0, name
