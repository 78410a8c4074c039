"""Tokenised examples kept on the worker's disk, so that a resumed attempt, a retried job or another job on
the same file skips reading, checking and encoding it again. An entry is keyed by everything that decides
its tokens: the data files' sha256, the tokenizer and chat template (ChatTokenizer.fingerprint()),
max_seq_length, train_on_inputs, the validation split's seed (when the split is carved from the training
file), and the code that encodes (its source). Entries are written atomically; the worker bounds the folder's
size (`evict_oldest`), least recently used first. Torch-free: the worker evicts, the recipe reads and writes."""

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shared.checksums import sha256_file
from shared.datasets import report, tokenization, validation
from shared.datasets.tokenization import ChatTokenizer, Encoded

# The layout of an entry; the encoding code is covered by the hash of its source.
FORMAT_VERSION = 1
ENTRY_SUFFIX = ".examples.json"
ENCODING_SOURCES = (
    Path(tokenization.__file__),
    Path(validation.__file__),
    Path(report.__file__),
    Path(__file__).with_name("data.py"),
)

Examples = tuple[list[Encoded], list[Encoded]]


class DatasetCache:
    def __init__(self, folder: Path, say: Callable[..., None] | None = None):
        self.folder = Path(folder)
        self.say = say  # the recipe's reporter.event, or None (a rank that keeps quiet)

    def key(self, tokenizer: ChatTokenizer, train_file: Path, validation_file: Path | None, *,
            max_seq_length: int, seed: int, train_on_inputs: bool) -> str:  # fmt: skip
        parts = {
            "format": FORMAT_VERSION,
            "code": code_version(),
            "train": sha256_file(train_file),
            # Without a validation file the held-out examples are drawn from the training file by seed.
            "validation": sha256_file(validation_file) if validation_file is not None else f"split:{seed}",
            "tokenizer": tokenizer.fingerprint(),
            "max_seq_length": max_seq_length,
            "train_on_inputs": train_on_inputs,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{ENTRY_SUFFIX}"

    def load(self, key: str) -> Examples | None:
        path = self.path(key)
        try:
            entry = json.loads(path.read_text())
            examples = decode(entry["train"]), decode(entry["validation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, or cut short by a crash of an older writer: encode again
        os.utime(path)  # recently used: evicted last
        return examples

    def store(self, key: str, examples: Examples) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{key}.part-{os.getpid()}-{threading.get_ident()}"
        partial.write_text(json.dumps({"train": encode(examples[0]), "validation": encode(examples[1])}))
        partial.replace(self.path(key))

    def fetch(self, key: str, build: Callable[[], Examples]) -> Examples:
        """The cached examples of `key`, or `build()`'s, kept for next time."""
        examples = self.load(key)
        if examples is not None:
            self.tell(f"Tokenised examples reused from this worker's cache ({key[:12]})")
            return examples
        started = time.monotonic()
        examples = build()
        try:
            self.store(key, examples)
        except OSError as exc:  # a full or read-only cache costs the next attempt some seconds, not this one
            self.tell(f"Tokenised examples not cached: {exc}")
            return examples
        self.tell(f"Examples tokenised in {time.monotonic() - started:.1f} s; kept in this worker's cache ({key[:12]})")
        return examples

    def tell(self, message: str) -> None:
        if self.say is not None:
            self.say("message", message=message)


def encode(examples: list[Encoded]) -> list[list]:
    return [[e.input_ids, e.labels, e.truncated, e.full_length] for e in examples]


def decode(rows: list[list]) -> list[Encoded]:
    return [Encoded(list(ids), list(labels), bool(truncated), int(full)) for ids, labels, truncated, full in rows]


_CODE_VERSION: str | None = None


def code_version() -> str:
    global _CODE_VERSION
    if _CODE_VERSION is None:
        digest = hashlib.sha256()
        for source in ENCODING_SOURCES:
            digest.update(source.read_bytes())
        _CODE_VERSION = digest.hexdigest()
    return _CODE_VERSION


def evict_oldest(folder: Path, max_bytes: int) -> list[Path]:
    """Remove the least recently used entries until the folder holds at most `max_bytes`; returns them."""
    try:
        entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in Path(folder).glob(f"*{ENTRY_SUFFIX}")]
    except FileNotFoundError:  # an entry evicted by another worker meanwhile
        return []
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries, key=lambda entry: entry[0]):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


_ACTIVE: DatasetCache | None = None


def use(cache: DatasetCache | None) -> None:
    """The cache this process's `data.load_examples` consults (set by the recipe's command line)."""
    global _ACTIVE
    _ACTIVE = cache


def active() -> DatasetCache | None:
    return _ACTIVE
