"""Held-out loss and greedy generations, for a base model with or without an adapter.

    python -m worker.training.evaluate --base DIR [--adapter DIR] --data heldout.jsonl [--generate N]

prints one JSON object: {"loss": ..., "tokens": ..., "generations": [...]}. The adapter is loaded with plain
`peft.PeftModel.from_pretrained`, as a user would."""

import argparse
import json
import sys
from pathlib import Path

import torch

from worker.training import data as chat_data
from worker.training.evaluation import labelled_logits, labelled_positions, token_loss_sum
from worker.training.model import compute_dtype, load_tokenizer


def load_for_inference(base: Path, adapter: Path | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=compute_dtype(), use_safetensors=True, trust_remote_code=False
    )
    if adapter is None:
        return model.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).eval()


@torch.no_grad()
def heldout_loss(model, base: Path, path: Path, max_seq_length: int = 1024) -> tuple[float, int]:
    """Mean loss per trained token (assistant turns, end-of-turn included) over a JSONL file."""
    from shared.datasets.tokenization import ChatTokenizer

    tokenizer = ChatTokenizer(base)
    kind, records = chat_data.read_records(path)
    total, tokens = 0.0, 0
    for example in chat_data.encode_records(tokenizer, kind, records, max_seq_length):
        batch = chat_data.collate([example], tokenizer.pad_id or 0)
        loss, _ = token_loss_sum(*labelled_logits(model, batch))
        total += float(loss)
        tokens += labelled_positions(batch["labels"])
    return total / max(tokens, 1), tokens


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 40) -> tuple[list[str], list[bool]]:
    """Greedy answers, and for each whether the model ended its turn (emitted EOS) within the budget."""
    answers, stopped = [], []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1] :]
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        stopped.append(bool((new == tokenizer.eos_token_id).any()))
    return answers, stopped


def first_user_prompts(path: Path, n: int) -> list[str]:
    _, records = chat_data.read_records(path)
    return [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in records[:n]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training.evaluate", description=__doc__)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--generate", type=int, default=0, help="greedy answers to the first N prompts")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.base)
    model = load_for_inference(args.base, args.adapter)
    loss, tokens = heldout_loss(model, args.base, args.data)
    prompts = first_user_prompts(args.data, args.generate)
    answers, stopped = generate(model, tokenizer, prompts)
    result = {"loss": loss, "tokens": tokens, "prompts": prompts, "generations": answers, "stopped": stopped}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
