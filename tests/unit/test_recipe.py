"""The recipe run alone (`python -m worker.training`) on a tiny random Llama with real NF4 quantisation. Each run
is forked, as the worker's are, from one process that loaded the libraries (`tests.support.python_m`); the one
that pauses while the model loads starts an interpreter of its own."""

import json
import os
import subprocess
import sys
import threading

import pytest
from safetensors import safe_open

from tests.support import ROOT, chat, python_m, start_python_m, write_jsonl
from worker.training.reporter import parse_line


def run_recipe(tmp_path, config: dict, name: str = "out") -> tuple[int, list[dict]]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    result = python_m("worker.training", ["--config", str(path), "--out", str(tmp_path / name)])
    events = [e for e in map(parse_line, result.stdout.splitlines()) if e]
    assert events, result.stderr[-3000:]
    return result.returncode, events


def parrot(tmp_path, n=24, name="train.jsonl"):
    return write_jsonl(tmp_path / name, [chat(f"Say {i}", f"Squawk! {i}. Squawk!") for i in range(n)])


def metrics_of(events):
    return [e for e in events if e["event"] == "metrics"]


def test_recipe_trains_checkpoints_and_saves_adapter(tmp_path, tiny_model):
    code, events = run_recipe(
        tmp_path,
        {
            "base_model_path": str(tiny_model),
            "train_file": str(parrot(tmp_path)),
            "n_epochs": 2,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "checkpoint_every_steps": 5,
            "seed": 3,
            "dataset_sha256": "abc",
        },
    )
    assert code == 0, events
    metrics = metrics_of(events)
    assert [m["step"] for m in metrics] == list(range(1, 13))  # 24 examples: 20 trained, 4 held out
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert {"learning_rate", "grad_norm", "tokens_per_second", "eta_seconds", "epoch", "progress"} <= metrics[0].keys()
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [5, 10]
    done = next(e for e in events if e["event"] == "done")
    assert done["trained_tokens"] > 0 and done["metrics"]["full_valid_loss"] > 0
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        assert any("lora_A" in key for key in weights.keys())
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["dataset"]["sha256"] == "abc" and "bitsandbytes" in manifest["libraries"]
    assert manifest["training"]["quantization"] == "nf4" and manifest["seed"] == 3
    assert len(manifest["tokenizer_sha256"]) == 64
    # Made again on demand from the delivered adapter and the job's config: the same held-out share of the
    # training file (seed 3), the same figures and the same prompts.
    made = tmp_path / "again"
    result = python_m(
        "worker.training.evaluate_job",
        ["--config", str(tmp_path / "out.json"), "--adapter", str(adapter), "--out", str(made)],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])["summary"].startswith("Evaluation on 1 validation examples")
    original, again = (json.loads((folder / "evaluation.json").read_text()) for folder in (tmp_path / "out", made))
    assert again["validation_examples"] == original["validation_examples"] == 1  # 5% of 24
    assert again["tuned"]["step"] == original["tuned"]["step"] == done["metrics"]["adapter"]["step"]
    for model in ("base", "tuned"):
        assert again[model]["loss"] == pytest.approx(original[model]["loss"], rel=1e-3)
        assert again[model]["token_accuracy"] == pytest.approx(original[model]["token_accuracy"], abs=0.02)
    assert [(s["prompt"], s["reference"]) for s in again["samples"]] == [
        (s["prompt"], s["reference"]) for s in original["samples"]
    ]


def test_evaluations_carry_openai_metric_names(tmp_path, tiny_model):
    train, valid = parrot(tmp_path, 16), parrot(tmp_path, 4, "valid.jsonl")
    code, events = run_recipe(
        tmp_path,
        {
            "base_model_path": str(tiny_model),
            "train_file": str(train),
            "validation_file": str(valid),
            "n_epochs": 2,
            "batch_size": 4,
            "n_evals": 4,
            "learning_rate": 5e-3,
        },
    )
    assert code == 0
    evaluated = [m for m in metrics_of(events) if "valid_loss" in m]
    assert [m["step"] for m in evaluated] == [2, 4, 6, 8]
    assert {"valid_loss", "valid_mean_token_accuracy", "train_mean_token_accuracy"} <= evaluated[0].keys()
    assert evaluated[-1]["valid_loss"] < evaluated[0]["valid_loss"]
    done = next(e for e in events if e["event"] == "done")["metrics"]
    assert done["initial_valid_loss"] > done["full_valid_loss"]
    assert any(e["event"] == "message" and e["message"].startswith("Before training: valid_loss=") for e in events)
    # The evaluation the job ends with: the scores the run measured, and three prompts answered by both models.
    evaluation = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert next(e for e in events if e["event"] == "done")["evaluation"] == str(tmp_path / "out" / "evaluation.json")
    assert evaluation["base"] == {
        "loss": done["initial_valid_loss"],
        "token_accuracy": done["initial_valid_mean_token_accuracy"],
    }
    assert evaluation["tuned"]["loss"] == done["adapter"]["valid_loss"] == done["full_valid_loss"]
    assert evaluation["improved"] is True and evaluation["validation_examples"] == 4
    assert [s["reference"] for s in evaluation["samples"]] == [f"Squawk! {i}. Squawk!" for i in range(3)]
    assert all(
        s["prompt"].endswith(f"Say {i}<|im_end|>\n<|im_start|>assistant\n") for i, s in enumerate(evaluation["samples"])
    )
    assert all(isinstance(s["base"], str) and isinstance(s["tuned"], str) for s in evaluation["samples"])
    assert any(
        e["event"] == "message" and e["message"].startswith("Evaluation on 4 validation examples") for e in events
    )


def test_same_seed_same_loss_curve(tmp_path, tiny_model):
    config = {
        "base_model_path": str(tiny_model),
        "train_file": str(parrot(tmp_path)),
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate": 5e-3,
        "seed": 9,
        "n_checkpoints": 0,
    }
    curves = []
    for name in ("first", "second"):
        code, events = run_recipe(tmp_path, config, name)
        assert code == 0
        curves.append([m["train_loss"] for m in metrics_of(events)])
    assert curves[0] == pytest.approx(curves[1], abs=1e-3)
    code, events = run_recipe(tmp_path, {**config, "seed": 10}, "other-seed")
    assert [m["train_loss"] for m in metrics_of(events)] != pytest.approx(curves[0], abs=1e-3)


def test_best_adapter_is_delivered_and_early_stopping(tmp_path, tiny_model):
    # A learning rate this high makes the validation loss rise after its first evaluations.
    train, valid = parrot(tmp_path, 16), write_jsonl(tmp_path / "v.jsonl", [chat("Other", "Different text")] * 4)
    base = {
        "base_model_path": str(tiny_model),
        "train_file": str(train),
        "validation_file": str(valid),
        "n_epochs": 6,
        "batch_size": 4,
        "n_evals": 12,
        "learning_rate": 5e-2,
        "seed": 2,
    }
    code, events = run_recipe(tmp_path, base, "best")
    assert code == 0
    done = next(e for e in events if e["event"] == "done")["metrics"]
    losses = {m["step"]: m["valid_loss"] for m in metrics_of(events) if "valid_loss" in m}
    best_step = min(losses, key=losses.get)
    assert done["adapter"] == {
        "selection": "best",
        "step": best_step,
        "valid_loss": losses[best_step],
        "valid_mean_token_accuracy": done["adapter"]["valid_mean_token_accuracy"],
    }
    # The evaluation is the delivered adapter's, an earlier step's than the last: its score, and its answers as
    # the adapter loaded on its own gives them.
    evaluation = json.loads((tmp_path / "best" / "evaluation.json").read_text())
    assert best_step < done["step"] and evaluation["tuned"]["step"] == best_step
    assert evaluation["tuned"]["loss"] == losses[best_step]
    assert evaluation["improved"] == (losses[best_step] < done["initial_valid_loss"])
    # The job's top-level validation figures are the delivered adapter's too, with its step; the last
    # evaluation's, which a user would otherwise read as the adapter's, are kept apart.
    assert done["valid_loss"] == done["full_valid_loss"] == losses[best_step] and done["valid_step"] == best_step
    assert done["full_valid_mean_token_accuracy"] == done["adapter"]["valid_mean_token_accuracy"]
    assert done["last_evaluation"]["step"] == 24 and done["last_evaluation"]["valid_loss"] == losses[24]
    beaten = losses[best_step] < done["initial_valid_loss"]
    assert done["base_beaten"] is evaluation["base_beaten"] is beaten
    assert any(e.get("level") == "warn" for e in events if e["event"] == "message") is not beaten
    assert [s["tuned"] for s in evaluation["samples"]] == answers_of_delivered_adapter(
        tiny_model, tmp_path / "best" / "adapter", evaluation["samples"], evaluation["max_new_tokens"]
    )
    code, events = run_recipe(tmp_path, {**base, "adapter_selection": "last"}, "last")
    done = next(e for e in events if e["event"] == "done")["metrics"]
    assert done["adapter"]["selection"] == "last" and done["valid_step"] == done["adapter"]["step"] == 24
    assert done["valid_loss"] == done["adapter"]["valid_loss"] == done["last_evaluation"]["valid_loss"]
    # The same run's last weights answer otherwise: the evaluation above did not answer with them.
    last = json.loads((tmp_path / "last" / "evaluation.json").read_text())
    assert last["tuned"]["step"] == 24 and [s["tuned"] for s in last["samples"]] != [
        s["tuned"] for s in evaluation["samples"]
    ]
    code, events = run_recipe(tmp_path, {**base, "early_stopping_patience": 1}, "early")
    done = next(e for e in events if e["event"] == "done")["metrics"]
    assert done["stopped_early"] and done["step"] < 24


def answers_of_delivered_adapter(base, adapter, samples: list[dict], max_new_tokens: int) -> list[str]:
    from peft import PeftModel

    from shared.datasets.tokenization import ChatTokenizer
    from worker.training.comparison import greedy_answers
    from worker.training.model import load_base_model

    tokenizer = ChatTokenizer(base)
    model = PeftModel.from_pretrained(load_base_model(base, "nf4"), adapter).eval()
    prompts = [tokenizer.tokenizer.encode(s["prompt"], add_special_tokens=False).ids for s in samples]
    return greedy_answers(model, tokenizer, prompts, max_new_tokens)


def test_base_is_really_nf4(tiny_model):
    import bitsandbytes as bnb

    from worker.training.model import load_base_model

    model = load_base_model(tiny_model, "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.quant_state.nested  # double quantisation


def test_bad_data_exits_2_with_line_number(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(chat("a", "b")) + "\n" + '{"messages": 5}\n')
    code, events = run_recipe(tmp_path, {"base_model_path": str(tiny_model), "train_file": str(data)})
    assert code == 2
    error = next(e for e in events if e["event"] == "error")
    assert error["code"] == "invalid_training_file" and "line 2" in error["message"]


def test_bad_config_names_the_field(tmp_path, tiny_model):
    code, events = run_recipe(tmp_path, {"base_model_path": str(tiny_model), "train_file": "x", "lora_r": 0})
    assert code == 2 and "lora_r" in events[0]["message"]


def test_gradients_survive_an_evaluation(tiny_model, monkeypatch):
    """Regression: an eval-mode forward must not switch bitsandbytes to its no-autograd inference kernel.
    bitsandbytes does that only where its CPU probe finds AVX512-BF16, so the probe is made to say yes: the
    layers then take that path on every machine (on an AVX2-only one too, where the probe says no)."""
    import bitsandbytes as bnb
    import torch

    from worker.training.model import attach_lora, load_base_model

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)  # read by each Linear4bit as it is built

    def first_layer_grad(evaluate_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = attach_lora(load_base_model(tiny_model, "nf4"), 4, 8, 0.0, ["q_proj", "v_proj"])
        ids = torch.arange(1, 17)[None]
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
            packed = [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
            assert layers and not packed, f"the evaluation moved {len(packed)} 4-bit layers to the inference kernel"
        model.train()
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)  # non-zero B so every path carries gradient
        model(input_ids=ids, labels=ids).loss.backward()
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad

    assert torch.allclose(first_layer_grad(False), first_layer_grad(True), atol=1e-6)


def test_pause_and_resume_continue_the_same_loss_curve(tmp_path, tiny_model):
    """SIGUSR1 saves the whole training state and exits 3; resuming from it continues the step count, and the
    curve matches an uninterrupted run (same seed: same data order, same dropout)."""
    paused_run_matches_uninterrupted(tmp_path, tiny_model)


def paused_run_matches_uninterrupted(tmp_path, model, lora_dropout: float = 0.05, tolerance: float = 1e-3) -> None:
    """Trains `model` straight through, then paused at step 3 and resumed; the two loss curves agree to
    `tolerance` step by step. LoRA dropout draws from the generator of the device the recipe runs on, so a
    resume that does not continue that generator's stream trains on other masks and drifts from the straight
    run (`tests/gpu/test_cuda_resume.py` runs this on CUDA)."""
    import signal

    config = {
        "base_model_path": str(model),
        "train_file": str(parrot(tmp_path, 40)),
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate": 5e-3,
        "seed": 4,
        "n_checkpoints": 0,
        "lora_dropout": lora_dropout,
    }
    code, events = run_recipe(tmp_path, config, "straight")
    assert code == 0
    straight = [m["train_loss"] for m in metrics_of(events)]

    path = tmp_path / "paused.json"
    path.write_text(json.dumps(config))
    process = start_python_m("worker.training", ["--config", str(path), "--out", str(tmp_path / "paused")])
    threading.Thread(target=process.stderr.read, daemon=True).start()
    first = []
    for line in process.stdout:
        event = parse_line(line)
        if event and event["event"] == "metrics":
            first.append(event)
            if event["step"] == 3:
                os.kill(process.pid, signal.SIGUSR1)
        if event and event["event"] == "paused":
            paused = event
    assert process.wait() == 3
    assert paused["step"] == first[-1]["step"] and 3 <= paused["step"] < len(straight)

    code, events = run_recipe(tmp_path, {**config, "resume_from": paused["path"]}, "resumed")
    assert code == 0
    rest = metrics_of(events)
    assert rest[0]["step"] == paused["step"] + 1 and rest[-1]["step"] == len(straight)
    assert [m["train_loss"] for m in first + rest] == pytest.approx(straight, abs=tolerance)


def test_a_pause_during_model_loading_is_honoured_after_the_first_step(tmp_path, tiny_model):
    import signal
    import time

    path = tmp_path / "early.json"
    path.write_text(
        json.dumps({"base_model_path": str(tiny_model), "train_file": str(parrot(tmp_path)), "n_checkpoints": 0})
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.training", "--config", str(path), "--out", str(tmp_path / "early")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    time.sleep(1.5)  # past interpreter start, before the first step
    os.kill(process.pid, signal.SIGUSR1)
    events = [e for e in map(parse_line, process.stdout) if e]
    assert process.wait() == 3
    assert next(e for e in events if e["event"] == "paused")["step"] == 1


def test_the_recipe_checkpoints_when_its_device_needs_it_and_refuses_a_job_that_cannot_fit(tmp_path, tiny_model):
    """With the slot's memory fixed (TUNEQUEUE_SLOT_MEMORY_MB), "auto" turns gradient checkpointing on when the
    estimated peak fits only with it, and a job that fits in no way fails before loading the model, naming the
    option to change (not retried: exit 2)."""
    import math

    from shared.jobs import memory
    from worker.training.model import compute_dtype

    shape = memory.ModelShape.of(json.loads((tiny_model / "config.json").read_text()))

    def need_mib(checkpointing: bool, tokens: int) -> float:
        estimate = memory.estimate_peak(
            shape,
            quantization="nf4",
            lora_r=16,
            lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
            forward_tokens=tokens,
            gradient_checkpointing=checkpointing,
            dtype_bytes=compute_dtype().itemsize,  # the recipe's: bf16 on a CPU with AVX512-BF16
            device="cpu",
        )
        return estimate.total * memory.MARGIN / 2**20

    rows = [chat(f"Tell {i}", "squawk " * (2100 if i % 2 else 3)) for i in range(12)]
    config = {
        "base_model_path": str(tiny_model),
        "train_file": str(write_jsonl(tmp_path / "long.jsonl", rows)),
        "max_seq_length": 2048,
        "n_epochs": 1,
        "batch_size": 4,
        "n_checkpoints": 0,
        "evaluation_prompts": 0,
    }

    def run(name: str, slot_mib: int) -> tuple[int, list[dict]]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        args = ["--config", str(path), "--out", str(tmp_path / name)]
        result = python_m("worker.training", args, env={"TUNEQUEUE_SLOT_MEMORY_MB": str(slot_mib)})
        return result.returncode, [e for e in map(parse_line, result.stdout.splitlines()) if e]

    between = math.ceil((need_mib(True, 2048) + need_mib(False, 2048)) / 2)
    assert need_mib(True, 2048) < between < need_mib(False, 2048)
    code, events = run("auto", between)
    assert code == 0, events[-3:]
    said = [e["message"] for e in events if e["event"] == "message" and e["message"].startswith("Peak memory")]
    assert said == [f"Peak memory estimate: {round(need_mib(True, 2048) / memory.MARGIN)} MiB of {between} MiB "
                    "(with gradient checkpointing, chosen to fit)"]  # fmt: skip
    small = math.ceil(need_mib(True, 512))
    assert small < need_mib(True, 2048)
    code, events = run("small", small)
    assert code == 2
    error = next(e for e in events if e["event"] == "error")
    assert error["code"] == "insufficient_memory" and error["param"] == "max_seq_length", error
    assert "lower max_seq_length to" in error["message"]
    assert not any(e["event"] == "metrics" for e in events)
