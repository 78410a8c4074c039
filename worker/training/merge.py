"""The LoRA update merged into the base's weights, tensor by tensor, in float32, cast last:

    W' = cast(W + (alpha / r) · B @ A)        (alpha / sqrt(r) with rsLoRA)

`W` is one of two choices (`base_weights`):
- `nf4`: the weights the adapter was trained against: each of the base's quantised layers quantised to 4 bits
  exactly as the recipe's loading quantises it (same quant type, block size, double quantisation and input
  dtype) and dequantised in float32, as bitsandbytes' 4-bit matmul uses it, the others as they are;
- `original`: the base's own 16-bit weights.
Merging into the 4-bit weights themselves (`merge_and_unload` on a quantised model) would round the update back
to 4 bits; here nothing is rounded but the final cast.

Memory stays bounded by one tensor and one output shard: the base's safetensors are read a tensor at a time
(`safe_open`), and the merged tensors are written in shards of at most `shard_bytes`, with the index
`from_pretrained` reads. The model's own config (dtype set), generation config and tokenizer files are copied
beside them."""

import json
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASE_WEIGHTS = ("nf4", "original")
WEIGHTS_INDEX = "model.safetensors.index.json"
# Everything but weights that `from_pretrained` and a tokenizer read from the base's folder.
COPIED = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
)


class MergeError(Exception):
    """An adapter that does not fit the base (a module it does not have, other shapes)."""


@dataclass(frozen=True)
class Quantisation:
    """How the recipe quantised the base's linear layers (`worker.training.model.quantization_config`)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double: bool = True
    input_dtype: torch.dtype = torch.bfloat16  # the dtype the weights were loaded in before quantising

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        packed, state = quantize_4bit(
            weight.to(self.input_dtype).contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double,
            quant_type=self.quant_type,
        )
        # Each value is its 4-bit code times its block's scale, in float32, as bitsandbytes' matmul computes it;
        # dequantising into the input dtype (the default) would round it to bf16 again.
        state.dtype = torch.float32
        return dequantize_4bit(packed, state)


@dataclass(frozen=True)
class LoraUpdate:
    a: torch.Tensor  # r × in
    b: torch.Tensor  # out × r
    scale: float

    def delta(self) -> torch.Tensor:
        return self.scale * (self.b.float() @ self.a.float())


def read_adapter(adapter_dir: Path) -> dict[str, LoraUpdate]:
    """The adapter's updates by the base weight they apply to (`model.layers.0.self_attn.q_proj.weight`)."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"only LoRA adapters merge; this one is {config.get('peft_type')}")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise MergeError(f"the adapter holds {key}, which is not a LoRA weight this merge knows")
        pairs.setdefault(f"{match[1]}.weight", {})[match[2]] = tensor
    updates = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise MergeError(f"the adapter holds only half of the LoRA pair of {name}")
        updates[name] = LoraUpdate(pair["A"], pair["B"], scale)
    return updates


def weight_files(base_dir: Path) -> list[str]:
    index = base_dir / WEIGHTS_INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def base_tensors(base_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the base's safetensors, one at a time, in file order."""
    from safetensors import safe_open

    for name in weight_files(base_dir):
        with safe_open(str(base_dir / name), framework="pt") as weights:
            for key in weights.keys():
                yield key, weights.get_tensor(key)


def tensor_count(base_dir: Path) -> int:
    from safetensors import safe_open

    count = 0
    for name in weight_files(base_dir):
        with safe_open(str(base_dir / name), framework="pt") as weights:
            count += len(list(weights.keys()))
    return count


def quantised_layer_weights(base_dir: Path) -> set[str]:
    """The weights bitsandbytes quantises when the recipe loads the base: every linear layer's but the output
    layer's (transformers keeps it in 16 bits), found on a model built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    output = model.get_output_embeddings()
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    }


def merge(
    base_dir: Path,
    adapter_dir: Path,
    out: Path,
    dtype: str = "bfloat16",
    base_weights: str = "nf4",
    quantisation: Quantisation | None = None,
    shard_bytes: int = 2 * 2**30,
    progress=lambda done, total: None,
) -> dict:
    """Writes the merged model to `out`; returns what was done (for the manifest)."""
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if base_weights not in BASE_WEIGHTS:
        raise MergeError(f"base_weights must be one of {', '.join(BASE_WEIGHTS)}, not {base_weights!r}")
    from safetensors.torch import save_file

    target = DTYPES[dtype]
    updates = read_adapter(adapter_dir)
    quantised = quantised_layer_weights(base_dir) if base_weights == "nf4" else set()
    quantisation = quantisation or Quantisation()
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shards: list[str] = []
    weight_map: dict[str, str] = {}
    shard_size, merged, total_bytes = 0, 0, 0

    def flush() -> None:
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_size = {}, 0

    total = tensor_count(base_dir)
    for done, (name, tensor) in enumerate(base_tensors(base_dir), 1):
        weight = tensor
        if name in quantised:
            weight = quantisation.round_trip(tensor)
        if name in updates:
            update = updates.pop(name)
            if update.delta().shape != tensor.shape:
                raise MergeError(f"the adapter's update of {name} is {tuple(update.delta().shape)}, the base's "
                                 f"weight {tuple(tensor.shape)}: the adapter was trained on another base")  # fmt: skip
            weight = weight.float() + update.delta()
            merged += 1
        weight = weight.to(target).contiguous()
        size = weight.numel() * weight.element_size()
        if shard and shard_size + size > shard_bytes:
            flush()
        shard[name], shard_size, total_bytes = weight, shard_size + size, total_bytes + size
        progress(done, total)
    flush()
    if updates:
        raise MergeError(f"the adapter updates weights the base does not have: {', '.join(sorted(updates)[:5])}")
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPIED:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    return {
        "dtype": dtype,
        "base_weights": base_weights,
        "merged_weights": merged,
        "requantised_weights": len(quantised),
        "shards": len(shards),
        "bytes": total_bytes,
    }
