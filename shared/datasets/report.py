"""The validation report: what the data will look like to the model, before a GPU is spent on it."""

import hashlib
import json
import random

from shared.datasets.tokenization import IGNORE_INDEX, ChatTokenizer, Encoded
from shared.datasets.validation import ValidationReport

AUTO_VALIDATION_FRACTION = 0.05
AUTO_VALIDATION_MAX = 200


def split_validation(records: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Carve a held-out set from the training records (5%, at most 200) when no validation file is given."""
    if len(records) < 20:
        return records, []
    count = min(AUTO_VALIDATION_MAX, max(1, round(len(records) * AUTO_VALIDATION_FRACTION)))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def fingerprint(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "line"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0


def build_report(
    structure: ValidationReport,
    tokenizer: ChatTokenizer,
    *,
    max_seq_length: int,
    train_on_inputs: bool = False,
    validation: ValidationReport | None = None,
) -> dict:
    """Statistics under the model's tokenizer and template; adds errors to `structure` for unusable data."""
    kind = structure.format or "chat"
    encoded = [tokenizer.encode(r, kind, max_seq_length, train_on_inputs) for r in structure.records]
    lengths = [e.full_length for e in encoded]
    truncated = sum(e.truncated for e in encoded)
    no_loss = [r["line"] for r, e in zip(structure.records, encoded, strict=True) if e.loss_tokens == 0]
    seen: dict[str, int] = {}
    duplicates = []
    for record in structure.records:
        key = fingerprint(record)
        if key in seen:
            duplicates.append({"line": record["line"], "same_as_line": seen[key]})
        else:
            seen[key] = record["line"]
    overlap = 0
    if validation is not None:
        overlap = sum(fingerprint(r) in seen for r in validation.records)
    if encoded and truncated == len(encoded):
        structure.error(
            structure.records[0]["line"],
            f"every example is longer than max_seq_length={max_seq_length} (median length {percentile(lengths, 0.5)} "
            "tokens); raise max_seq_length or shorten the examples",
        )
    for line in no_loss[:20]:
        structure.warn(line, f"no trainable tokens within max_seq_length={max_seq_length}; the example is skipped")
    if duplicates:
        structure.warn(
            duplicates[0]["line"],
            f"{len(duplicates)} duplicate example(s), first the same as line {duplicates[0]['same_as_line']}",
        )
    return {
        **structure.to_dict(),
        "tokenizer_sha256": tokenizer.fingerprint(),
        "max_seq_length": max_seq_length,
        "total_tokens": sum(len(e.input_ids) for e in encoded),
        "loss_tokens": sum(e.loss_tokens for e in encoded),
        "length": {"p50": percentile(lengths, 0.5), "p95": percentile(lengths, 0.95), "max": max(lengths, default=0)},
        "truncated_examples": truncated,
        "examples_without_loss": len(no_loss),
        "duplicates": len(duplicates),
        "train_validation_overlap": overlap,
        "validation_examples": validation.examples if validation is not None else None,
        "sample": rendered_sample(tokenizer, encoded[0]) if encoded else None,
    }


def rendered_sample(tokenizer: ChatTokenizer, example: Encoded) -> list[dict]:
    """The first example as text segments, each marked with whether it carries loss."""
    segments: list[dict] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if segments and segments[-1]["trained"] == trained:
            segments[-1]["ids"].append(token)
        else:
            segments.append({"trained": trained, "ids": [token]})
    return [{"text": tokenizer.decode(s["ids"]), "trained": s["trained"]} for s in segments]
