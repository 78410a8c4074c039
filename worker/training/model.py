"""The base model under bitsandbytes quantisation, with 16-bit LoRA adapters from PEFT on top."""

import shutil
from pathlib import Path

import torch

from worker.training import fused_norm
from worker.training.dropout import fuse_lora_inputs, use_lane_dropout
from worker.training.gated_mlp import fuse_gated_mlps
from worker.training.packed_attention import use_packed_attention


def import_bitsandbytes() -> None:
    """Imports bitsandbytes without handing its fallback kernels to `torch.compile`. bitsandbytes wraps a few
    pure-PyTorch kernels (4-bit and blockwise dequantisation for shapes its native kernels refuse, its 32-bit
    optimiser) in `torch.compile` when it is imported, which imports TorchInductor: about 1 s and 50 MiB of
    resident memory in every process that imports it (docs/BENCHMARKS.md), for kernels this recipe never calls
    on a GPU and only as a fallback on a CPU (odd widths), where they then run eagerly, with the same results.
    Called when this module is imported, so before PEFT or transformers import bitsandbytes themselves."""
    import sys

    if "bitsandbytes" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = _uncompiled  # type: ignore[assignment]
    try:
        import bitsandbytes  # noqa: F401
    finally:
        torch.compile = compile_


def _uncompiled(model=None, **options):
    return model if model is not None else (lambda fn: fn)


import_bitsandbytes()


def compute_dtype() -> torch.dtype:
    """bf16 where the hardware computes in it (GPUs from Ampere on; CPUs with AVX512-BF16 or AMX), float32
    elsewhere: on a CPU without them (an AVX2-only EPYC, say) PyTorch runs bf16 matmuls in a reference kernel,
    measured ~30x slower than float32 here (`docs/BENCHMARKS.md`). The LoRA result is the same recipe either way."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    return torch.float32


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(quantization: str, quant_storage_compute: bool = False):
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
            **({"bnb_4bit_quant_storage": compute_dtype()} if quant_storage_compute else {}),
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(path: Path, quantization: str = "nf4", quant_storage_compute: bool = False):
    """4-bit on one device: from the quantised copy beside the base (`quantised_copy`), made on the first load.
    ZeRO-3's layout (4-bit weights stored in the compute dtype) is quantised on every load."""
    config = quantization_config(quantization, quant_storage_compute)
    if quantization in ("nf4", "fp4") and not quant_storage_compute:
        from worker.training import quantised_copy

        copy = quantised_copy.copy_folder(path, quantised_copy_settings(config))
        model = quantised_copy.load_or_build(copy, from_pretrained, lambda: from_pretrained(path, config))
    else:
        model = from_pretrained(path, config)
    model.config.use_cache = False
    keep_trainable_layout(model)
    norms_in_float32(model)
    contiguous_head_input(model)
    return model


def contiguous_head_input(model) -> None:
    """The output layer gets its input in one piece. Generation asks for the last position's logits only, a
    strided slice of the hidden states; PyTorch's CPU matmul multiplies such a 3-D input by a frozen weight as a
    batched product over the weight expanded per row, which in bf16 it copies (49,152 x 576 for SmolLM2: 324 MiB
    and ~0.4 s for a prefill of 6 rows, against under 1 MiB and 8 ms contiguous; docs/BENCHMARKS.md).
    Contiguous inputs pass as they are."""
    model.get_output_embeddings().register_forward_pre_hook(contiguous_input)


def contiguous_input(_module, args):
    return (args[0].contiguous(), *args[1:])


def is_norm(module) -> bool:
    """A normalisation layer: torch's LayerNorm or RMSNorm, or a model's own (`LlamaRMSNorm`, `Qwen2RMSNorm`...)."""
    if isinstance(module, torch.nn.LayerNorm | torch.nn.RMSNorm):
        return True
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(
        getattr(module, "weight", None), torch.nn.Parameter
    )


def norms_in_float32(model) -> int:
    """Under a 16-bit compute dtype, every norm layer keeps its weights in float32 and computes in float32,
    rounding once, at its output, to the dtype it was given; returns how many layers it changed.

    PEFT's `prepare_model_for_kbit_training` casts these weights to float32 too. Its way also leaves every
    activation after the first norm in float32, doubling activation memory (what `micro_batch_tokens` and
    gradient checkpointing bound) while the 4-bit layers still multiply in the compute dtype; here the stream
    between layers stays in the compute dtype. A norm left in bf16 rounds twice: its normalised input, then the
    product with its weight. Measured held-out losses are in docs/BENCHMARKS.md ("bf16 numerics")."""
    if compute_dtype() == torch.float32:
        return 0
    changed = 0
    for module in model.modules():
        if not is_norm(module):
            continue
        for parameter in module.parameters(recurse=False):
            parameter.data = parameter.data.float()
        if fused_norm.can_fuse(module):  # on a CPU: the backward keeps the bf16 input, not a float32 copy
            fused_norm.fuse_norm(module)
        else:
            module.register_forward_pre_hook(_inputs_in_float32, with_kwargs=True)
            module.register_forward_hook(_output_in_input_dtype, with_kwargs=True)
        changed += 1
    return changed


def _inputs_in_float32(module, args, kwargs):
    module._tunequeue_input_dtype = args[0].dtype
    return (args[0].float(), *args[1:]), kwargs


def _output_in_input_dtype(module, _args, _kwargs, output):
    return output.to(module._tunequeue_input_dtype)


def from_pretrained(path: Path, quantization=None):
    """`quantization` None: as the folder's config says (unquantised, or the settings a quantised copy keeps)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path,
        # passed as None, it would override the settings a quantised copy's config keeps
        **({"quantization_config": quantization} if quantization is not None else {}),
        dtype=compute_dtype(),
        device_map=device(),
        use_safetensors=True,  # weights from the model store only, never pickles
        trust_remote_code=False,  # and never code shipped with a model
    )


def quantised_copy_settings(config) -> dict:
    """Everything besides the base's files that decides the quantised bytes or how they load."""
    import bitsandbytes
    import transformers

    return {
        "quantization": config.to_dict(),
        "compute_dtype": str(compute_dtype()),
        "device": device(),
        "versions": [torch.__version__, transformers.__version__, bitsandbytes.__version__],
    }


def keep_trainable_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference the first time its layer
    runs in eval mode, and from then on uses a kernel with no autograd, even back in train mode: gradients
    stop flowing through the base weights. Evaluation during training would do exactly that, so turn it off."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attach_lora(model, r: int, alpha: float, dropout: float, target_modules):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int; PEFT scales by alpha / r, a float works
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    use_packed_attention(model)  # on a CPU: each example of a packed row attended to on its own
    model = get_peft_model(model, config)
    use_lane_dropout(model)  # on a CPU: the same dropout with fewer random draws
    fuse_lora_inputs(model)  # on a CPU: the dropout inside LoRA's A, which keeps the input as it came
    fuse_gated_mlps(model)  # on a CPU: SiLU(gate) * up keeping two tensors for the backward, not three
    return model


def load_adapter_weights(model, path: Path) -> None:
    """The LoRA weights saved in `path` (by `save_adapter`) into the model's adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))


def save_adapter(model, path: Path) -> None:
    """The LoRA weights and their config as PEFT loads them, replacing whatever is at `path`."""
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path, safe_serialization=True)
