"""The validation report: what the data will look like to the model, before a GPU is spent on it.

Gathered one example at a time (`ExampleStatistics`): running counts, a histogram of lengths (exact
percentiles; its size is bounded by the longest example allowed), one 8-byte fingerprint per example for
duplicates, and the first example as the sample. No record is kept, so a file of any length fits."""

import hashlib
import json
import random
from collections import Counter

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


def short_fingerprint(record: dict) -> int:
    """64 bits of `fingerprint`: a set of a million of them is tens of megabytes, not hundreds."""
    return int(fingerprint(record)[:16], 16)


LENGTH_BINS = 12


def length_bins(histogram: Counter, bins: int = LENGTH_BINS) -> list[dict]:
    """Example lengths (tokens) in equal-width bins from 0 to the longest, each bin's width a multiple of 8:
    the shape of the data at a glance (the dashboard draws it), from the exact counts kept while reading."""
    if not histogram:
        return []
    per_bin = -(-max(histogram) // bins)  # ceiling division
    width = max(8, -(-per_bin // 8) * 8)
    counts = [0] * (max(histogram) // width + 1)
    for length, examples in histogram.items():
        counts[length // width] += examples
    return [{"from": i * width, "to": (i + 1) * width, "examples": n} for i, n in enumerate(counts)]


def histogram_percentile(histogram: Counter, q: float) -> int:
    """The value at quantile `q` of the values a histogram counts (the nearest rank), without listing them."""
    total = sum(histogram.values())
    if not total:
        return 0
    rank = min(total - 1, int(round(q * (total - 1))))
    for value in sorted(histogram):
        rank -= histogram[value]
        if rank < 0:
            return value
    raise AssertionError("unreachable: the ranks add up to the total")


class ExampleStatistics:
    """The report's figures for one file, fed example by example as the file streams past. `structure` is
    the file's structure report: its format is known from the first example on, and refusals go into it."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        structure: ValidationReport,
        *,
        max_seq_length: int,
        train_on_inputs: bool = False,
        max_tokens: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.structure = structure
        self.max_seq_length = max_seq_length
        self.train_on_inputs = train_on_inputs
        self.max_tokens = max_tokens
        self.examples = self.truncated = self.total_tokens = self.loss_tokens = 0
        self.lengths: Counter = Counter()
        self.no_loss: list[int] = []  # the first 20 lines, for warnings
        self.no_loss_count = 0
        self.seen: dict[int, int] = {}  # fingerprint -> first line
        self.duplicates = 0
        self.first_duplicate: tuple[int, int] | None = None
        self.first: tuple[int, Encoded] | None = None

    def add(self, record: dict) -> None:
        """Encodes one example and counts it; one over `max_tokens` is refused in the structure report."""
        line = record["line"]
        kind = self.structure.format or "chat"
        encoded = self.tokenizer.encode(record, kind, self.max_seq_length, self.train_on_inputs)
        if self.max_tokens is not None and encoded.full_length > self.max_tokens:
            self.structure.error(
                line,
                f"is {encoded.full_length:,} tokens long, over the limit of {self.max_tokens:,} tokens per example "
                "(TUNEQUEUE_MAX_TOKENS_PER_EXAMPLE); shorten or split it",
            )
            return
        self.examples += 1
        self.lengths[encoded.full_length] += 1
        self.truncated += encoded.truncated
        self.total_tokens += len(encoded.input_ids)
        self.loss_tokens += encoded.loss_tokens
        if encoded.loss_tokens == 0:
            self.no_loss_count += 1
            if len(self.no_loss) < 20:
                self.no_loss.append(line)
        if self.first is None:
            self.first = (line, encoded)
        self._count_duplicate(record, line)

    def _count_duplicate(self, record: dict, line: int) -> None:
        key = short_fingerprint(record)
        if key in self.seen:
            self.duplicates += 1
            self.first_duplicate = self.first_duplicate or (line, self.seen[key])
        else:
            self.seen[key] = line

    def holds(self, record: dict) -> bool:
        """Whether an example of another file (the validation file) is also in this one."""
        return short_fingerprint(record) in self.seen

    def report(self, validation: ValidationReport | None = None, overlap: int = 0) -> dict:
        """The report; adds the errors and warnings that need the whole file to the structure report."""
        structure, max_seq_length = self.structure, self.max_seq_length
        if self.first is not None and self.truncated == self.examples:
            structure.error(
                self.first[0],
                f"every example is longer than max_seq_length={max_seq_length} (median length "
                f"{histogram_percentile(self.lengths, 0.5)} tokens); raise max_seq_length or shorten the examples",
            )
        for line in self.no_loss:
            structure.warn(line, f"no trainable tokens within max_seq_length={max_seq_length}; the example is skipped")
        if self.first_duplicate is not None:
            structure.warn(
                self.first_duplicate[0],
                f"{self.duplicates} duplicate example(s), first the same as line {self.first_duplicate[1]}",
            )
        return {
            **structure.to_dict(),
            "tokenizer_sha256": self.tokenizer.fingerprint(),
            "max_seq_length": max_seq_length,
            "total_tokens": self.total_tokens,
            "loss_tokens": self.loss_tokens,
            "length": {
                "p50": histogram_percentile(self.lengths, 0.5),
                "p95": histogram_percentile(self.lengths, 0.95),
                "max": max(self.lengths, default=0),
                "bins": length_bins(self.lengths),
            },
            "truncated_examples": self.truncated,
            "examples_without_loss": self.no_loss_count,
            "duplicates": self.duplicates,
            "train_validation_overlap": overlap,
            "validation_examples": validation.examples if validation is not None else None,
            "sample": rendered_sample(self.tokenizer, self.first[1]) if self.first is not None else None,
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
