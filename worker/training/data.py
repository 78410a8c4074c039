"""Training data for the recipe: files read and checked by `shared.datasets`, encoded with the model's own
tokenizer and template, shuffled per epoch by seed, and collated either padded or packed.

Packing puts several examples of a batch in one row without attention across them: position ids restart at
0 for each example and no attention mask is passed, from which transformers builds a block-diagonal mask.
The batch keeps its examples (and so the optimizer its steps); only padding goes away."""

import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING

from shared.datasets.report import split_validation
from shared.datasets.tokenization import IGNORE_INDEX, ChatTokenizer, Encoded
from shared.datasets.validation import validate_jsonl
from worker.training import dataset_cache

if TYPE_CHECKING:
    import torch

__all__ = [
    "IGNORE_INDEX",
    "DatasetError",
    "load_examples",
    "batches",
    "collate",
    "collate_packed",
    "Collator",
    "predicted_tokens",
    "masked",
]


class DatasetError(ValueError):
    """Bad training data; the message names the line."""


def read_records(path: Path, min_examples: int = 1) -> tuple[str, list[dict]]:
    report = validate_jsonl(path.read_bytes(), min_examples=min_examples, keep_records=True)
    if not report.ok:
        raise DatasetError(f"{path.name}: {report.summary()}")
    assert report.format is not None
    return report.format, report.records


def encode_records(
    tokenizer: ChatTokenizer, kind: str, records: list[dict], max_seq_length: int, train_on_inputs: bool = False
) -> list[Encoded]:
    examples = []
    for record in records:
        try:
            example = tokenizer.encode(record, kind, max_seq_length, train_on_inputs)
        except Exception as exc:  # the template itself refused the conversation
            raise DatasetError(f"line {record['line']}: could not be rendered ({exc})") from exc
        if example.loss_tokens:
            examples.append(example)
    return examples


def load_examples(
    tokenizer: ChatTokenizer,
    train_file: Path,
    validation_file: Path | None,
    *,
    max_seq_length: int,
    seed: int,
    train_on_inputs: bool = False,
) -> tuple[list[Encoded], list[Encoded]]:
    """Training and validation examples, from this process's dataset cache when one is in use."""

    def tokenize() -> tuple[list[Encoded], list[Encoded]]:
        return tokenize_files(
            tokenizer, train_file, validation_file, max_seq_length=max_seq_length, seed=seed,
            train_on_inputs=train_on_inputs,
        )  # fmt: skip

    cache = dataset_cache.active()
    if cache is None:
        return tokenize()
    key = cache.key(
        tokenizer, train_file, validation_file, max_seq_length=max_seq_length, seed=seed,
        train_on_inputs=train_on_inputs,
    )  # fmt: skip
    return cache.fetch(key, tokenize)


def tokenize_files(
    tokenizer: ChatTokenizer,
    train_file: Path,
    validation_file: Path | None,
    *,
    max_seq_length: int,
    seed: int,
    train_on_inputs: bool = False,
) -> tuple[list[Encoded], list[Encoded]]:
    kind, records = read_records(train_file)
    if validation_file is not None:
        valid_kind, valid_records = read_records(validation_file)
    else:
        records, valid_records = split_validation(records, seed)
        valid_kind = kind
    train = encode_records(tokenizer, kind, records, max_seq_length, train_on_inputs)
    if not train:
        raise DatasetError(f"{train_file.name}: no example has trainable tokens within max_seq_length={max_seq_length}")
    valid = encode_records(tokenizer, valid_kind, valid_records, max_seq_length, train_on_inputs)
    return train, valid


def batches(examples: list[Encoded], batch_size: int, seed: int, epoch: int) -> list[list[Encoded]]:
    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [[examples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


# Rows are padded to a multiple of this many tokens. oneDNN (PyTorch's CPU kernels for bf16) keeps every
# matrix multiplication it has prepared, about 12 MB for each new number of tokens in a forward and backward of
# a 135M model: with widths that follow the data, a job's memory grew step after step (docs/BENCHMARKS.md).
# Multiples of 32 bound the shapes it sees (16 widths up to 512 tokens) for a few percent of padding.
ROW_MULTIPLE = 32


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def collate(batch: list[Encoded], pad_token_id: int, multiple: int = 1):
    import torch

    width = round_up(max(len(example.input_ids) for example in batch), multiple)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_rows(batch: list[Encoded], capacity: int) -> list[list[Encoded]]:
    """First-fit decreasing: as few rows of at most `capacity` tokens as the batch allows."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for example in sorted(batch, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= size), None)
        if slot is None:
            rows.append([example])
            room.append(capacity - size)
        else:
            rows[slot].append(example)
            room[slot] -= size
    return rows


def collate_packed(batch: list[Encoded], pad_token_id: int, capacity: int, multiple: int = 1):
    import torch

    rows = pack_rows(batch, capacity)
    width = round_up(max(sum(len(e.input_ids) for e in row) for row in rows), multiple)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start : start + n] = torch.tensor(example.labels)
            labels[r, start] = IGNORE_INDEX  # never predict an example's first token from the previous one
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # padding: its own segment, no loss
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@dataclasses.dataclass(frozen=True)
class Collator:
    """A batch as the model's inputs on its device: packed into rows, or one padded row per example, each row
    padded to a multiple of `multiple` tokens (padding carries no label and, packed, is a segment of its own)."""

    pad_id: int
    packing: bool
    device: "torch.device"
    multiple: int = ROW_MULTIPLE
    one_row: bool = False

    @classmethod
    def for_tokenizer(
        cls, tokenizer: ChatTokenizer, packing: bool, device: "torch.device", one_row: bool = False
    ) -> "Collator":
        """`one_row`: packed, the whole batch in one row, for a model that attends to each of a row's examples
        on its own (`worker.training.packed_attention`)."""
        if tokenizer.pad_id is None:  # ChatTokenizer pads with the end-of-sequence token when there is no pad
            raise ValueError("the base model's tokenizer has neither a pad nor an end-of-sequence token")
        return cls(tokenizer.pad_id, packing, device, one_row=one_row)

    def __call__(self, batch: list[Encoded]) -> dict[str, "torch.Tensor"]:
        if self.packing:
            # Rows as long as the longest example where attention covers the whole row, masked: its cost grows
            # with the square of the row's length, so longer rows would trade the padding saved for attention
            # over tokens that are masked anyway. Attention example by example has no such cost: one row, with
            # no padding but the row's rounding.
            lengths = [len(example.input_ids) for example in batch]
            capacity = sum(lengths) if self.one_row else max(lengths)
            tensors = collate_packed(batch, self.pad_id, capacity, self.multiple)
        else:
            tensors = collate(batch, self.pad_id, self.multiple)
        return {name: tensor.to(self.device) for name, tensor in tensors.items()}


def predicted_tokens(example: Encoded) -> int:
    """Tokens of an example that count in the loss: its labels but the first, which nothing predicts."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def masked(example: Encoded) -> Encoded:
    """The same tokens with no label: a forward and backward that contribute nothing."""
    return dataclasses.replace(example, labels=[IGNORE_INDEX] * len(example.labels))
