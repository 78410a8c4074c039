"""A merged Llama-architecture model (`merge`) written as one GGUF file for llama.cpp and Ollama, with an Ollama
`Modelfile` beside it.

The `gguf` package (llama.cpp's own Python package) does the file format, the tensor names
(`TensorNameMap`), the Q8_0 quantisation and the special tokens with the chat template (`SpecialVocab`). What it
leaves to llama.cpp's `convert_hf_to_gguf.py`, which is not packaged, is written here and tested: the model's
hyperparameters as llama.cpp's Llama reads them, the BPE vocabulary with its token types, the pre-tokenizer's
name (llama.cpp splits text by it before BPE: only splits known here are exported, `llama_cpp_pre_tokenizer`,
never a guess), and the
rotary layout of the query and key weights (llama.cpp's Llama pairs rotary dimensions differently from
transformers: the rows are permuted as `convert_hf_to_gguf.py` does, and transformers permutes them back when it
reads a GGUF).

Tensors are converted one at a time and spooled to a temporary file (at most 256 MiB of them held in memory)
before the file is written."""

import json
from pathlib import Path

import numpy as np
import torch

QUANTIZATIONS = ("f16", "q8_0")
ARCHITECTURES = ("LlamaForCausalLM",)


class GgufUnsupported(Exception):
    """A base this export cannot write as GGUF: another architecture, or a tokenizer llama.cpp is not told how to
    pre-tokenise."""


def llama_cpp_pre_tokenizer(pre_tokenizer: dict | None) -> str | None:
    """The name llama.cpp gives the way this tokenizer splits text before BPE (`tokenizer.ggml.pre`), for the
    splits known here; None for others. GPT-2's byte-level split: `gpt2`; the same after each digit is split
    off (SmolLM's published tokenizer): `smollm`."""

    def part(step: dict) -> tuple:
        if step.get("type") == "ByteLevel":
            return ("ByteLevel", bool(step.get("add_prefix_space")), step.get("use_regex", True))
        if step.get("type") == "Digits":
            return ("Digits", bool(step.get("individual_digits")))
        return (step.get("type"),)

    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    known = {
        (("ByteLevel", False, True),): "gpt2",
        (("Digits", True), ("ByteLevel", False, True)): "smollm",
    }
    return known.get(tuple(part(step) for step in steps or []))


def check_supported(model_dir: Path) -> str:
    """The name of the tokenizer's pre-tokenizer in llama.cpp, or GgufUnsupported saying why and what to do."""
    config = json.loads((model_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not set(architectures) & set(ARCHITECTURES):
        raise GgufUnsupported(
            f"GGUF export writes {', '.join(ARCHITECTURES)} models; this base is {', '.join(architectures) or '?'}: "
            "export it as merged and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise GgufUnsupported("the base has no tokenizer.json (a fast BPE tokenizer) to write into the GGUF")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    if (tokenizer.get("model") or {}).get("type") != "BPE":
        raise GgufUnsupported("GGUF export writes byte-level BPE tokenizers; this base's is not one")
    pre = llama_cpp_pre_tokenizer(tokenizer.get("pre_tokenizer"))
    if pre is None:
        raise GgufUnsupported(
            "llama.cpp would split text differently from this base's tokenizer (its pre_tokenizer is not one this "
            "export knows): export it as merged and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return pre


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: within each head, rows (2, d/2) → (d/2, 2)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types: control for special added tokens, user-defined for other added ones,
    normal otherwise; ids the tokenizer does not use are padded, as llama.cpp's converter pads them."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(int(TokenType.UNUSED))
        elif index in added:
            tokens.append(by_id[index])
            types.append(int(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[index])
            types.append(int(TokenType.NORMAL))
    return tokens, types


def rope_parameters(config: dict) -> dict:
    """RoPE's settings: transformers 5 writes them as `rope_parameters`; earlier versions as `rope_theta` and
    `rope_scaling` at the top level."""
    if config.get("rope_parameters"):
        return config["rope_parameters"]
    return {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}


def write_gguf(model_dir: Path, path: Path, quantization: str, name: str, progress=lambda done, total: None) -> dict:
    """`model_dir`: a merged model (float32 best: each tensor is rounded once, here). Returns what was written."""
    import gguf
    from safetensors import safe_open

    from worker.training.merge import weight_files

    if quantization not in QUANTIZATIONS:
        raise GgufUnsupported(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    pre = check_supported(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hidden, blocks = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise GgufUnsupported("bases with rope scaling are not written as GGUF here: export merged and convert it")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama", use_temp_file=True)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    file_type = gguf.LlamaFileType.MOSTLY_F16 if quantization == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types = vocabulary(model_dir, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(model_dir), load_merges=True, n_vocab=config["vocab_size"])
    special.add_to_gguf(writer, quiet=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    files = weight_files(model_dir)
    total = sum(len(list(safe_open(str(model_dir / f), framework="pt").keys())) for f in files)
    done, written = 0, {"F32": 0, "F16": 0, "Q8_0": 0}
    for file in files:
        with safe_open(str(model_dir / file), framework="pt") as weights:
            for key in weights.keys():
                tensor = weights.get_tensor(key).float()
                mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if mapped is None:
                    raise GgufUnsupported(f"no GGUF name for the tensor {key}")
                if key.endswith("q_proj.weight"):
                    tensor = permute_rotary(tensor, heads)
                elif key.endswith("k_proj.weight"):
                    tensor = permute_rotary(tensor, kv_heads)
                array = tensor.numpy()
                if array.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
                    writer.add_tensor(mapped, array.astype(np.float32))
                    written["F32"] += 1
                elif quantization == "q8_0" and array.shape[-1] % 32 == 0:
                    quantized = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(mapped, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                    written["Q8_0"] += 1
                else:
                    writer.add_tensor(mapped, array.astype(np.float16))
                    written["F16"] += 1
                done += 1
                progress(done, total)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"quantization": quantization, "tokenizer_pre": pre, "tensors": written, "bytes": path.stat().st_size}


def modelfile(gguf_name: str, chat_template: str | None, stops: list[str]) -> str:
    """An Ollama Modelfile. Ollama reads the chat template from the GGUF's metadata and recognises the common
    ones; ChatML (SmolLM2's) is also written out as Ollama's own template, so that older Ollama versions format
    turns the same way. The end-of-turn tokens are stop words."""
    lines = [f"FROM ./{gguf_name}", ""]
    if chat_template and "<|im_start|>" in chat_template:
        lines += [
            'TEMPLATE """{{- if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}",
            "{{ .Content }}<|im_end|>",
            '{{ end }}<|im_start|>assistant\n"""',
            "",
        ]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
