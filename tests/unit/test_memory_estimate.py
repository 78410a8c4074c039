"""The pre-flight peak-memory estimate (`shared.jobs.memory`): what it decides for `gradient_checkpointing`, the
option it names when a job cannot fit, how it holds against peaks the recipe measured, and the job's dry run and
validation refusing a job no worker's slot can hold."""

import json

import pytest

from shared.jobs import memory
from tests.unit.test_api import client, upload  # noqa: F401 (the fixture)

SMOLLM2 = memory.ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True)
OPTIONS = {
    "max_seq_length": 2048,
    "quantization": "nf4",
    "lora_r": 16,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
CPU = memory.Slot(memory_bytes=0, device="cpu", dtype_bytes=4)


def estimate(checkpointing: bool, length: int = 2048, shape=SMOLLM2, **options) -> memory.MemoryEstimate:
    return memory.estimate_peak(
        shape,
        quantization=options.get("quantization", "nf4"),
        lora_r=16,
        lora_targets=OPTIONS["lora_target_modules"],
        forward_tokens=memory.forward_tokens(length, 512),
        gradient_checkpointing=checkpointing,
        dtype_bytes=4,
        device="cpu",
    )


# Peak RSS of `python -m worker.training` on SmolLM2-135M-Instruct, NF4, LoRA r=16 on q/k/v/o, batch 2, float32
# (2-core AMD EPYC, AVX2), examples as long as max_seq_length (docs/BENCHMARKS.md, "Peak memory estimate").
MEASURED_MIB = {(512, False): 1421.5, (1024, False): 2030.5, (2048, False): 3217.3, (512, True): 796.6,
                (2048, True): 950.8}  # fmt: skip


@pytest.mark.parametrize("length, checkpointing", list(MEASURED_MIB))
def test_the_estimate_is_near_the_measured_peaks(length, checkpointing):
    measured = MEASURED_MIB[(length, checkpointing)]
    assert estimate(checkpointing, length).total / 2**20 == pytest.approx(measured, rel=0.05)


def test_one_forward_takes_a_micro_batch_or_the_longest_example():
    assert memory.forward_tokens(2048, 512) == 2048  # one long example alone
    assert memory.forward_tokens(2048, 512, longest_example=300) == 512  # micro-batches of short ones
    assert memory.forward_tokens(2048, 512, longest_example=5000) == 2048  # truncated to max_seq_length
    assert memory.forward_tokens(256, 0) == 256


def budget_between(low: memory.MemoryEstimate, high: memory.MemoryEstimate) -> int:
    return int((low.total + high.total) / 2 * memory.MARGIN)


def test_auto_checkpoints_only_when_the_job_would_not_fit_without():
    without, with_checkpointing = estimate(False), estimate(True)
    assert with_checkpointing.total < without.total / 2
    roomy = memory.Slot(int(without.total * memory.MARGIN) + 1, "cpu", 4)
    report, refusal = memory.plan(SMOLLM2, {**OPTIONS, "gradient_checkpointing": "auto"}, None, roomy)
    assert refusal is None and report["gradient_checkpointing"] is False and report["fits"]
    tight = memory.Slot(budget_between(with_checkpointing, without), "cpu", 4)
    report, refusal = memory.plan(SMOLLM2, {**OPTIONS, "gradient_checkpointing": "auto"}, None, tight)
    assert refusal is None and report["gradient_checkpointing"] is True
    assert report["estimated_peak_mib"] == round(with_checkpointing.total / 2**20)
    # Short examples: one forward holds a micro-batch, not max_seq_length's worth, and it fits without.
    report, refusal = memory.plan(SMOLLM2, {**OPTIONS, "gradient_checkpointing": "auto"}, 300, tight)
    assert refusal is None and report["gradient_checkpointing"] is False and report["forward_tokens"] == 512


def test_a_job_that_cannot_fit_names_the_option_to_change():
    without, with_checkpointing = estimate(False), estimate(True)
    tight = memory.Slot(budget_between(with_checkpointing, without), "cpu", 4)
    _, refusal = memory.plan(SMOLLM2, {**OPTIONS, "gradient_checkpointing": False}, None, tight)
    assert refusal is not None and refusal[1] == "gradient_checkpointing" and "set gradient_checkpointing" in refusal[0]
    # Too small even with checkpointing: the longest max_seq_length that fits, which does fit, 64 more does not.
    small = memory.Slot(int((estimate(True, 512).total + estimate(True, 1024).total) / 2 * memory.MARGIN), "cpu", 4)
    _, refusal = memory.plan(SMOLLM2, {**OPTIONS, "gradient_checkpointing": True}, None, small)
    assert refusal is not None and refusal[1] == "max_seq_length"
    length = int(refusal[0].split("lower max_seq_length to ")[1].split()[0])
    assert memory.fits(estimate(True, length), small.memory_bytes)
    assert not memory.fits(estimate(True, length + 64), small.memory_bytes)
    # Not even the weights: no length helps.
    _, refusal = memory.plan(SMOLLM2, {**OPTIONS, "gradient_checkpointing": True}, None, memory.Slot(2**28, "cpu", 4))
    assert refusal is not None and refusal[1] == "model"


def offer(slot_bytes: int) -> None:
    """A training worker's heartbeat whose slots offer `slot_bytes` each, float32 on a CPU."""
    from shared.db import session_scope
    from shared.ids import now
    from shared.workers.service import record_heartbeat

    slots = {"kind": "cpu", "total": 1, "free": 1, "devices": ["0"], "memory_bytes": slot_bytes,
             "compute_bytes": 4}  # fmt: skip
    with session_scope() as session:
        record_heartbeat(session, "small-node", pid=1, started_at=now(), current_jobs=[], info={"slots": slots})


def test_the_dry_run_and_validation_refuse_a_job_no_slot_can_hold(client, tiny_model):  # noqa: F811
    from shared.db import session_scope
    from shared.jobs.models import Job
    from worker import tasks

    config = json.loads((tiny_model / "config.json").read_text())
    shape = memory.ModelShape.of(config)
    # Half the examples longer than max_seq_length: one forward takes a whole max_seq_length.
    long = "".join(json.dumps({"messages": [{"role": "user", "content": f"Tell {i}"}, {"role": "assistant",
                   "content": "squawk " * (1500 if i % 2 else 5)}]}) + "\n" for i in range(12)).encode()  # fmt: skip
    training_file = upload(client, long).json()["id"]
    body = {"model": "tiny-llama", "training_file": training_file, "max_seq_length": 1024, "dry_run": True}
    # No worker has said what its slots offer: nothing to compare with, nothing refused.
    dry = client.post("/v1/fine_tuning/jobs", json={**body, "gradient_checkpointing": False}).json()
    assert dry["valid"] is True and dry["report"]["memory"] == {}
    without, with_checkpointing = (estimate(c, 1024, shape) for c in (False, True))
    offer(budget_between(with_checkpointing, without))
    dry = client.post("/v1/fine_tuning/jobs", json={**body, "gradient_checkpointing": False}).json()
    assert dry["valid"] is False and dry["report"]["memory"]["param"] == "gradient_checkpointing", dry["report"]
    dry = client.post("/v1/fine_tuning/jobs", json=body).json()  # "auto"
    assert dry["valid"] is True and dry["report"]["memory"]["gradient_checkpointing"] is True
    assert dry["training_options"]["gradient_checkpointing"] == "auto"
    # The job's own validation on a worker decides the same and fails the job, naming the option.
    job = client.post("/v1/fine_tuning/jobs", json={**body, "dry_run": False, "gradient_checkpointing": False}).json()
    tasks.validate(job["id"])
    failed = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "insufficient_memory"
    assert failed["error"]["param"] == "gradient_checkpointing" and "MiB" in failed["error"]["message"]
    assert failed["validation_report"]["memory"]["fits"] is False
    with session_scope() as session:
        assert session.get(Job, job["id"]).status == "failed"
    good = client.post("/v1/fine_tuning/jobs", json={**body, "dry_run": False}).json()
    tasks.validate(good["id"])
    assert client.get(f"/v1/fine_tuning/jobs/{good['id']}").json()["status"] == "queued"
