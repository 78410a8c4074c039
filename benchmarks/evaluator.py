"""The one judge of `make bench`'s first table: held-out loss on the assistant's tokens, the same code for the base
model, tunequeue's adapter and TRL's. Runs in its own process:

    python -m benchmarks.evaluator --base DIR [--adapter DIR] --data heldout.jsonl

loads the NF4 base (as both runs trained on it) and the adapter with plain transformers + peft, computes every
logit with the model's own forward (none of the recipe's training code), and prints one JSON line with the mean
cross-entropy per trained token, the tokens chosen by tunequeue's chat masks (assistant turns, end of turn)."""

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.trl_peer import load_quantised_base
from shared.datasets.tokenization import IGNORE_INDEX, ChatTokenizer
from worker.training import data as chat_data


def load(base: Path, adapter: Path | None):
    model = load_quantised_base(base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@torch.no_grad()
def assistant_loss(model, base: Path, data: Path) -> tuple[float, int]:
    """Mean loss per trained token, one conversation at a time (no padding, no packing to get wrong)."""
    tokenizer = ChatTokenizer(base)
    kind, records = chat_data.read_records(data)
    total, tokens = 0.0, 0
    for example in chat_data.encode_records(tokenizer, kind, records, max_seq_length=4096):
        ids = torch.tensor([example.input_ids], device=model.device)
        target = torch.tensor(example.labels[1:], device=model.device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((target != IGNORE_INDEX).sum())
    return total / max(tokens, 1), tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluator", description=__doc__)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args(argv)
    loss, tokens = assistant_loss(load(args.base, args.adapter), args.base, args.data)
    print(json.dumps({"loss": loss, "tokens": tokens}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
