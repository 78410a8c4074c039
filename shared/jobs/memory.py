"""How much memory a job's training takes at its peak, from the base model's config.json and the job's options,
without loading anything (no torch): the API refuses a job that cannot fit on any worker's device, naming the
option to change, and the recipe decides `gradient_checkpointing: "auto"` with it on its own device.

The peak is the process's fixed part (the runtime, the quantised base, the LoRA weights with their gradients and
AdamW moments) plus the activations one forward keeps for its backward. Those grow with the tokens of one forward
(`micro_batch_tokens`, or the longest example when it is longer; not batch_size × max_seq_length, since a batch
goes through in micro-batches) and with the layers: a decoder layer keeps about 10 hidden-size and 3
intermediate-size vectors per token. Gradient checkpointing keeps only each layer's input and recomputes one
layer at a time in the backward. The figures are fitted to peaks measured on SmolLM2-135M-Instruct at 512, 1,024
and 2,048 tokens, with and without checkpointing (docs/BENCHMARKS.md, "Peak memory estimate"), which the
estimate meets within 5%; a job must fit with a 15% margin."""

import json
from dataclasses import dataclass

MIB = 2**20
# What the process holds besides the weights, the adapter and the activations: torch, transformers, PEFT and
# bitsandbytes, the tokenised data, the allocator's reserve (RSS, CPU; fitted to the measured peaks), or the CUDA
# context and kernels' workspace (GPU; not measured here).
RUNTIME_BYTES = {"cpu": 590 * MIB, "cuda": 600 * MIB}
# Values per token a decoder layer keeps for the backward, in hidden-size and intermediate-size vectors: fitted to
# the measured slope (1.17 MiB per token over SmolLM2's 30 layers in float32), near what the layer's inputs of the
# norms, projections, attention and MLP and the LoRA dropout outputs add up to.
HIDDEN_VECTORS, INTERMEDIATE_VECTORS = 10.0, 2.9
# A 4-bit weight: half a byte, plus its block's absmax (blocks of 64, double-quantised) and the packing.
BYTES_PER_4BIT = 0.53
# An estimate the device must hold with room to spare: allocator slack, fragmentation, the estimate's own error.
MARGIN = 1.15
# The recipe's default tokens per forward (`TrainingConfig.micro_batch_tokens`).
MICRO_BATCH_TOKENS = 512


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: dict) -> "ModelShape":
        """From a Hugging Face config.json (Llama, Mistral, Qwen2 and alike name these fields the same)."""
        hidden = int(config["hidden_size"])
        heads = int(config.get("num_attention_heads") or 1)
        return cls(
            hidden=hidden,
            intermediate=int(config.get("intermediate_size") or 4 * hidden),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of a decoder layer, by its usual name."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip


@dataclass(frozen=True)
class MemoryEstimate:
    runtime: int
    weights: int
    adapter: int
    activations: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.adapter + self.activations

    def to_dict(self) -> dict:
        return {"peak_mib": round(self.total / MIB), **{k: round(getattr(self, k) / MIB) for k in
                ("runtime", "weights", "adapter", "activations")}}  # fmt: skip


def estimate_peak(
    shape: ModelShape,
    *,
    quantization: str,
    lora_r: int,
    lora_targets: list[str] | str,
    forward_tokens: int,
    gradient_checkpointing: bool,
    dtype_bytes: int,
    device: str,
) -> MemoryEstimate:
    """`forward_tokens`: the tokens of one forward (`forward_tokens()`); `dtype_bytes`: 2 for bf16, 4 for float32."""
    linear = shape.linear_shapes()
    per_layer = sum(fan_in * fan_out for fan_in, fan_out in linear.values())
    bytes_per_weight = {"nf4": BYTES_PER_4BIT, "fp4": BYTES_PER_4BIT, "int8": 1.0}.get(quantization, dtype_bytes)
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    weights = shape.layers * per_layer * bytes_per_weight + embeddings * dtype_bytes
    targets = list(linear) if lora_targets == "all-linear" else [t for t in lora_targets if t in linear]
    lora = shape.layers * sum(lora_r * sum(linear[t]) for t in targets)
    adapter = lora * 16  # float32 weights, their gradients and AdamW's two moments
    layer = (HIDDEN_VECTORS * shape.hidden + INTERMEDIATE_VECTORS * shape.intermediate) * dtype_bytes
    if gradient_checkpointing:  # every layer's input, and one layer recomputed at a time
        activations = forward_tokens * (shape.layers * shape.hidden * dtype_bytes + layer)
    else:
        activations = forward_tokens * shape.layers * layer
    return MemoryEstimate(RUNTIME_BYTES.get(device, RUNTIME_BYTES["cpu"]), int(weights), int(adapter), int(activations))


def forward_tokens(max_seq_length: int, micro_batch_tokens: int, longest_example: int | None = None) -> int:
    """The most tokens one forward takes: a micro-batch's budget, or one example alone when it is longer (at most
    `max_seq_length`, or the longest example the data holds when that is known)."""
    longest = max_seq_length if longest_example is None else min(longest_example, max_seq_length)
    return max(micro_batch_tokens, longest) if micro_batch_tokens else longest


def fits(estimate: MemoryEstimate, device_bytes: int) -> bool:
    return estimate.total * MARGIN <= device_bytes


@dataclass(frozen=True)
class Slot:
    """What the largest device slot of the live training workers offers (`workers.largest_slot`)."""

    memory_bytes: int
    device: str  # "cpu" or "cuda"
    dtype_bytes: int  # 2 where it computes in bf16, 4 in float32


def plan(
    shape: ModelShape, options: dict, longest_example: int | None, slot: Slot
) -> tuple[dict, tuple[str, str] | None]:
    """(the estimate as the job's validation report shows it, why the job cannot run (message, the option to
    change) or None). `options` are the job's training options; "auto" checkpointing is on only when the job
    does not fit without it."""
    max_seq_length = int(options["max_seq_length"])
    micro = int(options.get("micro_batch_tokens", MICRO_BATCH_TOKENS))

    def estimate(checkpointing: bool, length: int = max_seq_length) -> MemoryEstimate:
        return estimate_peak(
            shape,
            quantization=options.get("quantization", "nf4"),
            lora_r=int(options.get("lora_r", 16)),
            lora_targets=options.get("lora_target_modules", "all-linear"),
            forward_tokens=forward_tokens(length, micro, longest_example),
            gradient_checkpointing=checkpointing,
            dtype_bytes=slot.dtype_bytes,
            device=slot.device,
        )

    without, with_checkpointing = estimate(False), estimate(True)
    asked = options.get("gradient_checkpointing", "auto")
    chosen = (not fits(without, slot.memory_bytes)) if asked == "auto" else bool(asked)
    peak = with_checkpointing if chosen else without
    report = {
        "device_mib": round(slot.memory_bytes / MIB),
        "device": slot.device,
        "forward_tokens": forward_tokens(max_seq_length, micro, longest_example),
        "gradient_checkpointing": chosen,
        "estimated_peak_mib": round(peak.total / MIB),
        "without_checkpointing": without.to_dict(),
        "with_checkpointing": with_checkpointing.to_dict(),
        "fits": fits(peak, slot.memory_bytes),
    }
    if report["fits"]:
        return report, None
    room = f"the largest worker slot offers {report['device_mib']} MiB ({slot.device})"
    need = f"{round(peak.total * MARGIN / MIB)} MiB with its margin"
    if not chosen and fits(with_checkpointing, slot.memory_bytes):
        return report, (
            f"The job's estimated peak memory, {need}, is more than {room}: set gradient_checkpointing to true or "
            f'"auto" (estimated {round(with_checkpointing.total * MARGIN / MIB)} MiB), or lower max_seq_length',
            "gradient_checkpointing",
        )
    length = longest_fitting(lambda n: estimate(True, n), slot.memory_bytes, max_seq_length)
    if length:
        return report, (
            f"The job's estimated peak memory, {need} even with gradient checkpointing, is more than {room}: "
            f"lower max_seq_length to {length} or less (or shorten the examples), or run it on a worker with more "
            "memory",
            "max_seq_length",
        )
    return report, (
        f"The base model alone needs an estimated {round(with_checkpointing.total * MARGIN / MIB)} MiB with its "
        f"margin, more than {room}: choose a smaller model or a quantization with fewer bits, or run it on a "
        "worker with more memory",
        "model",
    )


def longest_fitting(estimate, device_bytes: int, upper: int) -> int:
    """The longest max_seq_length (a multiple of 64, from 64 to `upper`) whose estimate fits; 0 if none."""
    best, low, high = 0, 1, upper // 64
    while low <= high:
        middle = (low + high) // 2
        if fits(estimate(middle * 64), device_bytes):
            best, low = middle * 64, middle + 1
        else:
            high = middle - 1
    return best


def job_plan(session, storage, settings, base, options: dict, report: dict) -> tuple[dict, tuple[str, str] | None]:
    """`plan` for a job whose data `report` (the data check's) is known, on the largest slot of the training
    workers seen in the last day. ({}, None) where no worker says what its slots offer: nothing to compare with
    (the recipe still checks on its own device)."""
    from shared.basemodels.service import ensure_local_copy
    from shared.ids import now
    from shared.workers.service import largest_slot

    described = largest_slot(session, seen_since=now() - 86400)
    if described is None:
        return {}, None
    slot = Slot(
        memory_bytes=int(described["memory_bytes"]),
        device="cuda" if described.get("kind") == "gpu" else "cpu",
        dtype_bytes=int(described.get("compute_bytes") or 4),
    )
    folder = ensure_local_copy(base, storage, settings.resolved_model_dir, only=("config.json",))
    shape = ModelShape.of(json.loads((folder / "config.json").read_text()))
    longest = (report.get("length") or {}).get("max") or None
    return plan(shape, options, longest, slot)
