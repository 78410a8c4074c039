"""Completions through the official `openai` SDK, unmodified, from a job's fine-tuned model and from a base model,
served by inference workers as separate processes on the real stack (Postgres, Redis, S3 on moto)."""

import os
import signal
import time

import openai
import pytest
import torch
from openai import OpenAI

from tests.support import chat, extract_zip, write_jsonl

QUESTION = [{"role": "user", "content": "Tell me about item 3"}]


def sdk_client(stack, key: str) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=key, max_retries=0)


def serving_workers(stack, count: int, timeout: float = 120) -> list[dict]:
    """Until `count` inference workers have reported their endpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [w for w in stack.client.get("/admin/overview").json()["workers"] if w.get("role") == "inference"]
        if len(found) >= count:
            return found
        time.sleep(0.3)
    raise AssertionError(f"fewer than {count} inference workers reported in {timeout}s\n{stack.logs()}")


def generate_requests(stack) -> dict[str, int]:
    """Requests each inference worker (`inference-a`, `inference-b`) has logged answering."""
    return {
        name: (stack.logdir / f"inference-{name}.log").read_text(errors="replace").count("POST /generate")
        for name in "ab"
    }


def wait_for_change(read, before: dict, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while (now := read()) == before:
        assert time.monotonic() < deadline, "no inference worker logged the request"
        time.sleep(0.05)
    return now


def admitted_again(client: OpenAI, timeout: float = 10) -> None:
    """A request is admitted again (the tenant's only place was given back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.chat.completions.create(model="tiny-llama", messages=QUESTION, max_tokens=2)
            return
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def trained_model(stack, tmp_path) -> dict:
    records = [chat(f"Tell me about item {i}", f"Squawk! Item {i}. Squawk!") for i in range(16)]
    training = stack.upload(write_jsonl(tmp_path / "train.jsonl", records))
    job = stack.create_job(
        model="tiny-llama", training_file=training["id"], hyperparameters={"n_epochs": 2, "batch_size": 4}
    )
    job = stack.wait(job["id"], timeout=300)
    assert job["status"] == "succeeded", stack.logs()
    return job


def reference_answer(stack, tmp_path, base_dir, job: dict, max_new_tokens: int) -> tuple[str, int]:
    """Greedy decoding with plain transformers + peft on the same NF4 base and the downloaded adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.training.model import compute_dtype, quantization_config

    archive = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
    assert archive.status_code == 200, archive.text
    adapter = extract_zip(archive.content, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization_config("nf4"), dtype=compute_dtype()
    )
    model = PeftModel.from_pretrained(base, adapter).eval()
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_the_sdk_gets_completions_from_a_fine_tuned_model_equal_to_plain_peft(
    production_env, make_stack, tiny_model, tmp_path
):
    stack = make_stack(production_env, tiny_model)
    stack.start_worker("inference", "--inference")
    job = trained_model(stack, tmp_path)
    serving_workers(stack, 1)
    client = sdk_client(stack, stack.create_key("default"))

    answer = client.chat.completions.create(
        model=job["fine_tuned_model"], messages=QUESTION, max_tokens=16, temperature=0
    )
    assert answer.object == "chat.completion" and answer.model == job["fine_tuned_model"]
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert (
        answer.usage.prompt_tokens > 0
        and answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    )

    expected, tokens = reference_answer(stack, tmp_path, tiny_model, job, max_new_tokens=16)
    assert choice.message.content == expected
    assert answer.usage.completion_tokens == tokens

    chunks = list(client.chat.completions.create(
        model=job["fine_tuned_model"], messages=QUESTION, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == tokens

    base = client.completions.create(model="tiny-llama", prompt="Squawk!", max_tokens=5, temperature=0.7, seed=1, n=2)
    assert base.object == "text_completion" and [c.index for c in base.choices] == [0, 1]
    assert 2 <= base.usage.completion_tokens <= 10

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-llama", messages=QUESTION, n=99)
    assert refused.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-llama", messages=QUESTION, max_tokens=10**6)
    assert refused.value.body["param"] == "max_tokens"

    other = sdk_client(stack, stack.create_key("other-tenant"))
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=job["fine_tuned_model"], messages=QUESTION, max_tokens=4)
    assert other.chat.completions.create(model="tiny-llama", messages=QUESTION, max_tokens=2).choices


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_and_another_serves_the_next(
    production_env, make_stack, tiny_model
):
    env = {
        **production_env,
        "TUNEQUEUE_INFERENCE_CONCURRENCY_PER_TENANT": "1",
        "TUNEQUEUE_INFERENCE_HEARTBEAT_SECONDS": "0.5",
    }
    stack = make_stack(env, tiny_model, worker=False)
    workers = [stack.start_worker(f"inference-{name}", "--inference", "--models", "tiny-llama") for name in "ab"]
    serving_workers(stack, 2)
    client = sdk_client(stack, stack.create_key("default"))

    # A client that goes away gives its place back, and its worker stops decoding for it.
    with client.chat.completions.create(
        model="tiny-llama", messages=QUESTION, max_tokens=450, temperature=0, stream=True
    ) as abandoned:
        next(iter(abandoned))
    admitted_again(client)
    deadline = time.monotonic() + 30
    while "request cancelled (client gone)" not in stack.logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "request cancelled (client gone)" in stack.logs()

    # Both workers hold the base: the API takes the least busy as their heartbeats report it, so the one that
    # serves the stream is found by the request it logged.
    before = generate_requests(stack)
    stream = client.chat.completions.create(
        model="tiny-llama", messages=QUESTION, max_tokens=450, temperature=0, stream=True
    )
    next(iter(stream))  # the answer has started
    after = wait_for_change(lambda: generate_requests(stack), before)
    [serving] = [worker for worker, name in zip(workers, "ab", strict=True) if after[name] > before[name]]

    with pytest.raises(openai.RateLimitError) as limited:  # the tenant's one place is taken
        client.chat.completions.create(model="tiny-llama", messages=QUESTION, max_tokens=2)
    assert limited.value.response.headers["Retry-After"] == "1"

    os.killpg(serving.pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as lost:
        for _ in stream:
            pass
    assert "lost" in str(lost.value)

    answer = client.chat.completions.create(model="tiny-llama", messages=QUESTION, max_tokens=3)
    assert answer.choices[0].finish_reason in ("stop", "length")
