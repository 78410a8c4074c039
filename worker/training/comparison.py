"""The evaluation every job ends with: the base model against the tuned one on the job's validation set.

Their loss and token accuracy per labelled token come from the run itself: the base model's validation before
the first step, and the delivered adapter's at the step it was chosen (best or last). What the run has not
computed is what each model says: for the first few validation prompts, both models' greedy answers side by
side, generated here once at the end from the weights already in memory, the base's with the adapter switched
off. Both models' prompts go through in one left-padded batch, so a handful of answers from each costs about
as many forward passes as one answer has tokens.

The recipe writes the result as `evaluation.json` in its output folder; the worker stores it with the job."""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from shared.datasets.report import split_validation
from shared.datasets.tokenization import ChatTokenizer
from shared.datasets.validation import CHAT, PROMPT_COMPLETION
from shared.proc import kib_field
from worker.training.data import read_records

EVALUATION_FILE = "evaluation.json"
FORMAT = "tunequeue.evaluation/1"


@dataclass(frozen=True)
class SamplePrompt:
    text: str  # what both models are given, verbatim
    reference: str  # the validation example's own answer
    ids: list[int]


def prompt_and_reference(tokenizer: ChatTokenizer, kind: str, record: dict) -> tuple[str, str] | None:
    """Chat: the messages before the last assistant turn, rendered with the chat template and its generation
    prompt, and that turn. Prompt/completion: the prompt and the completion. Text data has no prompt (None)."""
    if kind == CHAT:
        messages = record["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        if not last:
            return None  # no turn to answer, or nothing before it to answer
        return tokenizer.render(messages[:last], add_generation_prompt=True), messages[last]["content"]
    if kind == PROMPT_COMPLETION:
        return record["prompt"], record["completion"]
    return None


def sample_prompts(
    tokenizer: ChatTokenizer, kind: str, records: list[dict], count: int, max_tokens: int
) -> list[SamplePrompt]:
    """The first `count` validation examples that have a prompt of at most `max_tokens` tokens (the job's
    max_seq_length: what it trained on), encoded as training encodes (`ChatTokenizer.prompt_ids`)."""
    prompts: list[SamplePrompt] = []
    for record in records:
        if len(prompts) == count:
            break
        found = prompt_and_reference(tokenizer, kind, record)
        if found is None:
            continue
        ids = tokenizer.prompt_ids(found[0], kind)
        if 0 < len(ids) <= max_tokens:
            prompts.append(SamplePrompt(found[0], found[1], list(ids)))
    return prompts


def validation_records(train_file: Path, validation_file: Path | None, seed: int) -> tuple[str, list[dict]]:
    """The validation examples as records: the validation file, or the share of the training file held out by
    `seed` (the same split the run validated on)."""
    if validation_file is not None:
        return read_records(validation_file)
    kind, records = read_records(train_file)
    return kind, split_validation(records, seed)[1]


@torch.no_grad()
def greedy_answers(
    model, tokenizer: ChatTokenizer, prompts: list[list[int]], max_new_tokens: int, synced: bool = False, **inputs
) -> list[str]:
    """Each prompt's greedy answer, all in one batch padded on the left, each cut at its first end-of-sequence
    token. `synced`: every rank of a multi-device run generates alike, ZeRO-3 gathering the weights each step.
    `inputs`: more arguments for the model's forward."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,  # the recipe loads its model with the cache off, for training
        eos_token_id=tokenizer.eos_id,
        pad_token_id=pad,
    )
    device = next(model.parameters()).device
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=settings,
        synced_gpus=synced,
        **inputs,
    )
    return [answer_text(tokenizer, row) for row in output[:, width:].tolist()]


def answer_text(tokenizer: ChatTokenizer, ids: list[int]) -> str:
    if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.tokenizer.decode(ids, skip_special_tokens=True).strip()


@contextmanager
def weights_dequantised_once(model) -> Iterator[None]:
    """On a CPU, while open, each 4-bit layer multiplies by its weight dequantised once, not at every call.
    bitsandbytes' CPU path dequantises the whole weight on each forward: a training step's forward does that once
    for many tokens, a generated token does it again for one (about half of each token's time on SmolLM2-135M).
    The product is the same (bitsandbytes dequantises, then multiplies, in the compute dtype). The copies take the
    base's size in that dtype while the answers are generated: where that is more than half the memory available,
    the layers stay as they are. On a GPU its 4-bit kernels stay."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    layers = [
        m
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
        and m.weight.device.type == "cpu"
        and not hasattr(m.weight, "ds_id")  # ZeRO-3 holds a share of it: gathered only inside its forward
    ]
    size = sum(m.in_features * m.out_features * _dtype_bytes(m.compute_dtype) for m in layers)
    if not layers or size > available_memory() / 2:
        yield
        return
    for layer in layers:
        packed: bnb.nn.Params4bit = layer.weight  # type: ignore[assignment]
        weight = dequantize_4bit(packed.data, packed.quant_state).to(layer.compute_dtype or torch.float32)
        layer.forward = partial(_linear, weight=weight, bias=layer.bias)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's own again


def _dtype_bytes(dtype: torch.dtype | None) -> int:
    return (dtype or torch.float32).itemsize


def _linear(x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))


def available_memory() -> int:
    """Bytes the kernel can still give without swapping (`MemAvailable`); 0 where it does not say."""
    return kib_field("/proc/meminfo", "MemAvailable")


@contextmanager
def half_the_threads_on_cpu(model) -> Iterator[None]:
    """Generating a few rows a token at a time is hundreds of small matrix products per token, bound by memory
    bandwidth rather than arithmetic: more threads than half the cores add little, and when other work shares
    the cores each product waits for its slowest thread. Measured on 2 cores (AVX2 EPYC; SmolLM2-135M, 3 prompts
    of each model, 64 tokens): idle, 19 s on one thread and 17 s on two; shared with other work, 21 s on one
    and 64-130 s on two."""
    threads = torch.get_num_threads()
    if next(model.parameters()).device.type != "cpu" or threads < 2:
        yield
        return
    torch.set_num_threads(threads // 2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def side_by_side(
    model, tokenizer: ChatTokenizer, prompts: list[SamplePrompt], max_new_tokens: int, synced: bool = False
) -> list[dict]:
    """Both models' greedy answers to each prompt: `model` is the PEFT model with the delivered adapter. Both go
    in one batch, the base's rows with the adapter off (PEFT's mixed batches: adapter `__base__`), so that each
    generated token costs one pass over the weights for both models."""
    if not prompts:
        return []
    ids = [prompt.ids for prompt in prompts]
    adapters = [model.active_adapter] * len(ids) + ["__base__"] * len(ids)
    model.eval()
    with weights_dequantised_once(model), half_the_threads_on_cpu(model):
        answers = greedy_answers(model, tokenizer, ids + ids, max_new_tokens, synced, adapter_names=adapters)
    tuned, base = answers[: len(ids)], answers[len(ids) :]
    return [
        {"prompt": prompt.text, "reference": prompt.reference, "base": base_answer, "tuned": tuned_answer}
        for prompt, base_answer, tuned_answer in zip(prompts, base, tuned, strict=True)
    ]


def scores(validation: dict) -> dict[str, float] | None:
    """Validation metrics (`valid_loss`, `valid_mean_token_accuracy`) under the evaluation's names."""
    if validation.get("valid_loss") is None:
        return None
    return {"loss": validation["valid_loss"], "token_accuracy": validation["valid_mean_token_accuracy"]}


def build_evaluation(
    initial: dict,
    delivered: dict,
    adapter: dict,
    validation_examples: int,
    samples: list[dict],
    base_beaten: bool | None = None,
    **notes,
) -> dict:
    """`initial`: the base model's validation metrics; `delivered`: the delivered adapter's; `adapter`: which
    one it is (selection and step); `base_beaten`: whether any evaluation of the run beat the base model (None
    where it is not known: an evaluation made later from the delivered adapter alone). `notes`: what else a
    reader should know (generation settings, why there are no samples)."""
    base, tuned = scores(initial), scores(delivered)
    return {
        "format": FORMAT,
        "created_at": int(time.time()),
        "validation_examples": validation_examples,
        "base": base,
        "tuned": None if tuned is None else {**tuned, "step": adapter.get("step"), "selection": adapter["selection"]},
        "improved": None if base is None or tuned is None else tuned["loss"] < base["loss"],
        "base_beaten": base_beaten,
        "samples": samples,
        **notes,
    }


def write_evaluation(out: Path, evaluation: dict) -> Path:
    path = out / EVALUATION_FILE
    path.write_text(json.dumps(evaluation, indent=2))
    return path


def summary(evaluation: dict) -> str:
    """One line for the job's events."""
    base, tuned = evaluation["base"], evaluation["tuned"]
    if base is None or tuned is None:
        return "Evaluation: no validation examples, nothing to compare on"
    verdict = "improved" if evaluation["improved"] else "not improved"
    return (
        f"Evaluation on {evaluation['validation_examples']} validation examples: valid_loss base {base['loss']:.4f} "
        f"-> tuned {tuned['loss']:.4f} ({verdict}), token accuracy {base['token_accuracy']:.4f} -> "
        f"{tuned['token_accuracy']:.4f}; {len(evaluation['samples'])} sample answer(s) from each"
    )
