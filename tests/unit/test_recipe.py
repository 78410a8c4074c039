"""The recipe run alone (`python -m worker.training`) on a tiny random Llama with real NF4 quantisation."""

import json
import subprocess
import sys

from safetensors import safe_open

from tests.support import ROOT, chat, write_jsonl
from worker.training.reporter import parse_line


def run_recipe(tmp_path, config: dict) -> tuple[int, list[dict]]:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "worker.training", "--config", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    events = [e for e in map(parse_line, result.stdout.splitlines()) if e]
    return result.returncode, events


def test_recipe_trains_checkpoints_and_saves_adapter(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"Say {i}", f"Squawk! {i}. Squawk!") for i in range(24)])
    code, events = run_recipe(
        tmp_path,
        {
            "base_model_path": str(tiny_model),
            "train_file": str(data),
            "n_epochs": 2,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "checkpoint_every_steps": 5,
            "seed": 3,
            "dataset_sha256": "abc",
        },
    )
    assert code == 0, events
    metrics = [e for e in events if e["event"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert {"learning_rate", "grad_norm", "tokens_per_second", "eta_seconds", "epoch", "progress"} <= metrics[0].keys()
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [5, 10]
    done = next(e for e in events if e["event"] == "done")
    assert done["trained_tokens"] > 0
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        assert any("lora_A" in key for key in weights.keys())
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["dataset"]["sha256"] == "abc" and "bitsandbytes" in manifest["libraries"]
    assert manifest["training"]["quantization"] == "nf4"


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
