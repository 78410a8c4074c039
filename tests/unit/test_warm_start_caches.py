"""The caches behind a warm start: the base model's local copy (verified once, trusted while unchanged) and
tokenised datasets (keyed by everything that decides their tokens, bounded in size)."""

import hashlib
import os
from pathlib import Path

import pytest

from shared.basemodels import service as basemodels
from shared.basemodels.models import BaseModelRecord
from shared.datasets.tokenization import ChatTokenizer
from shared.storage import LocalStorage
from tests.support import chat, write_jsonl
from worker.training import data, dataset_cache
from worker.training.dataset_cache import DatasetCache, evict_oldest


@pytest.fixture
def stored_model(tmp_path) -> tuple[BaseModelRecord, LocalStorage]:
    storage = LocalStorage(tmp_path / "storage")
    files = {}
    for name, body in (("config.json", b'{"a": 1}'), ("model.safetensors", os.urandom(4096))):
        storage.put_bytes(f"models/m/{name}", body)
        files[name] = hashlib.sha256(body).hexdigest()
    record = BaseModelRecord(id="m", storage_prefix="models/m", files=files)
    return record, storage


@pytest.fixture
def counted_hashing(monkeypatch) -> list[Path]:
    hashed: list[Path] = []
    real = basemodels.sha256_file

    def counting(path: Path) -> str:
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(basemodels, "sha256_file", counting)
    return hashed


def test_a_verified_model_copy_is_not_hashed_again(stored_model, tmp_path, counted_hashing):
    record, storage = stored_model
    folder = basemodels.ensure_local_copy(record, storage, tmp_path / "models")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(record.files)
    counted_hashing.clear()
    assert basemodels.ensure_local_copy(record, storage, tmp_path / "models") == folder
    assert counted_hashing == []


def test_a_changed_model_copy_is_detected_and_fetched_again(stored_model, tmp_path, counted_hashing):
    record, storage = stored_model
    folder = basemodels.ensure_local_copy(record, storage, tmp_path / "models")
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"\0" * len(original))  # same size: only the modification time tells
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    basemodels.ensure_local_copy(record, storage, tmp_path / "models")
    assert weights.read_bytes() == original
    assert counted_hashing.count("model.safetensors") == 1 and "config.json" not in counted_hashing


def test_a_partial_copy_for_validation_is_completed_for_training(stored_model, tmp_path, counted_hashing):
    record, storage = stored_model
    folder = basemodels.ensure_local_copy(record, storage, tmp_path / "models", only=("config.json",))
    assert not (folder / "model.safetensors").exists()
    basemodels.ensure_local_copy(record, storage, tmp_path / "models")
    assert (folder / "model.safetensors").is_file()
    assert counted_hashing == []  # downloads are hashed as they are written; nothing was read twice


def test_a_model_copy_marked_by_an_older_worker_is_verified_once(stored_model, tmp_path, counted_hashing):
    record, storage = stored_model
    folder = basemodels.ensure_local_copy(record, storage, tmp_path / "models")
    (folder / ".tunequeue-verified.json").write_text('{"config.json": "x", "model.safetensors": "y"}')
    basemodels.ensure_local_copy(record, storage, tmp_path / "models")
    basemodels.ensure_local_copy(record, storage, tmp_path / "models")
    assert sorted(counted_hashing) == ["config.json", "model.safetensors"]


@pytest.fixture
def tokenizer(tiny_model) -> ChatTokenizer:
    return ChatTokenizer(tiny_model)


@pytest.fixture
def train_file(tmp_path) -> Path:
    # Prompts from short to longer than max_seq_length=64: a longer limit changes the examples.
    return write_jsonl(
        tmp_path / "train.jsonl", [chat(f"what is {i}+{i}? " + "please " * i, f"{2 * i}") for i in range(30)]
    )


def load(tokenizer, train_file, **options):
    options = {"max_seq_length": 64, "seed": 1, "train_on_inputs": False, **options}
    return data.load_examples(tokenizer, train_file, None, **options)


@pytest.fixture
def cache(tmp_path):
    said: list[str] = []
    cache = DatasetCache(tmp_path / "cache", lambda kind, message: said.append(message))
    dataset_cache.use(cache)
    yield cache, said
    dataset_cache.use(None)


def test_a_dataset_is_tokenised_once_then_read_from_the_cache(cache, tokenizer, train_file, monkeypatch):
    _, said = cache
    first = load(tokenizer, train_file)
    monkeypatch.setattr(data, "tokenize_files", lambda *a, **k: pytest.fail("tokenised again"))
    assert load(tokenizer, train_file) == first
    assert said[0].startswith("Examples tokenised") and said[1].startswith("Tokenised examples reused")


@pytest.mark.parametrize(
    "change", [{"max_seq_length": 128}, {"train_on_inputs": True}, {"seed": 2}], ids=lambda c: next(iter(c))
)
def test_what_decides_the_tokens_is_in_the_key(cache, tokenizer, train_file, change):
    folder = cache[0].folder
    plain = load(tokenizer, train_file)
    changed = load(tokenizer, train_file, **change)
    assert len(list(folder.glob("*.examples.json"))) == 2
    assert changed == data.tokenize_files(tokenizer, train_file, None, **{**OPTIONS, **change}) != plain
    assert plain == data.tokenize_files(tokenizer, train_file, None, **OPTIONS)


OPTIONS = {"max_seq_length": 64, "seed": 1, "train_on_inputs": False}


def test_a_changed_file_or_tokenizer_misses(cache, tokenizer, train_file, tiny_model, tmp_path):
    cache_object, _ = cache
    key = cache_object.key(tokenizer, train_file, None, **OPTIONS)
    write_jsonl(train_file, [chat("other", "data")] * 30)
    assert cache_object.key(tokenizer, train_file, None, **OPTIONS) != key
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((tiny_model / name).read_bytes())
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert cache_object.key(ChatTokenizer(other), train_file, None, **OPTIONS) != key


def test_a_broken_entry_is_tokenised_again(cache, tokenizer, train_file):
    cache_object, said = cache
    first = load(tokenizer, train_file)
    [entry] = cache_object.folder.glob("*.examples.json")
    entry.write_text(entry.read_text()[:100])  # cut short
    assert load(tokenizer, train_file) == first
    assert said[-1].startswith("Examples tokenised")


def test_the_cache_evicts_the_least_recently_used_entries(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    for age, name in enumerate(["new", "middle", "old"]):
        path = folder / f"{name}.examples.json"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1_000_000 - age * 100, 1_000_000 - age * 100))
    removed = evict_oldest(folder, 2000)
    assert [p.name for p in removed] == ["old.examples.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["middle.examples.json", "new.examples.json"]
