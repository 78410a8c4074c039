"""Chat JSONL → token ids and labels. The conversation is rendered with the tokenizer's own chat template;
only assistant turns carry loss (unless `train_on_inputs`), and each turn's span includes its end-of-turn
token so the tuned model learns to stop."""

import json
import random
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100


class DatasetError(ValueError):
    """Bad training data; the message names the line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def read_chat_jsonl(path: Path) -> list[tuple[int, list[dict]]]:
    records = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                messages = record["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(f"line {number}: not a chat example ({exc})") from exc
            records.append((number, messages))
    if not records:
        raise DatasetError(f"{path.name} holds no examples")
    return records


def encode_chat(tokenizer, messages: list[dict], max_seq_length: int, train_on_inputs: bool = False) -> Example:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = [(0, len(text))] if train_on_inputs else _assistant_spans(tokenizer, messages, text)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(input_ids) > max_seq_length
    return Example(input_ids[:max_seq_length], labels[:max_seq_length], truncated)


def _assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = (
            tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        )
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not text.startswith(through) or not through.startswith(prompt):
            raise DatasetError("the chat template does not render conversations prefix by prefix")
        spans.append((len(prompt), len(through)))
    return spans


def encode_file(tokenizer, path: Path, max_seq_length: int, train_on_inputs: bool = False) -> list[Example]:
    examples = []
    for number, messages in read_chat_jsonl(path):
        try:
            example = encode_chat(tokenizer, messages, max_seq_length, train_on_inputs)
        except DatasetError as exc:
            raise DatasetError(f"line {number}: {exc}") from exc
        except Exception as exc:  # the template itself refused the conversation
            raise DatasetError(f"line {number}: the chat template could not render it ({exc})") from exc
        if any(label != IGNORE_INDEX for label in example.labels):
            examples.append(example)
    if not examples:
        raise DatasetError(f"{path.name}: no example has assistant tokens within max_seq_length={max_seq_length}")
    return examples


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [[examples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def collate(batch: list[Example], pad_token_id: int):
    import torch

    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
