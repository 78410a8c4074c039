"""Base models held quantised, fine-tuned adapters applied unmerged on top, and the decoding of requests.

One base is loaded once per worker, however many fine-tuned models of it are served: each adapter adds its own
LoRA matrices (a few MB) to the same PEFT model, and the least recently used one is deleted when more than
`inference_adapters` are held. Requests queue for one decoding thread, which takes every waiting request for
the same base (up to `inference_max_batch` sequences) and decodes them together: one forward per token for
the whole batch, each row with its own adapter (PEFT's mixed-adapter batches), its own sampling and its own
end. Rows that finish early ride along until the batch ends; requests arriving meanwhile wait for the next."""

import collections
import dataclasses
import logging
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from worker.inference.decoding import Sampling, Sequence, choose
from worker.training.model import compute_dtype, contiguous_head_input, device, quantization_config

log = logging.getLogger("tunequeue.inference")
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    """Where a fine-tuned model's adapter lies: its name (the job id), storage key and sha256."""

    name: str
    key: str
    sha256: str | None


@dataclasses.dataclass
class Request:
    """One completion request, with `n` choices; `emit` receives its events from the decoding thread."""

    base: str
    adapter: AdapterSource | None
    prompt: list[int]
    sampling: Sampling
    n: int
    emit: Callable[[dict], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


class LoadedBase:
    """A base model and its tokenizer, and the adapters currently applied to it (an LRU)."""

    def __init__(self, model_id: str, folder: Path, quantization: str, capacity: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id, self.folder, self.capacity = model_id, folder, capacity
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        config = None if quantization == "none" else quantization_config(quantization)
        self.base = AutoModelForCausalLM.from_pretrained(
            folder,
            **({"quantization_config": config} if config is not None else {}),
            dtype=compute_dtype(),
            device_map=device(),
            use_safetensors=True,
            trust_remote_code=False,
        ).eval()
        contiguous_head_input(self.base)
        self.peft: Any = None  # a PeftModel once the first adapter is applied
        self.adapters: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.eos = self._end_tokens()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)

    def _end_tokens(self) -> set[int]:
        ids = self.base.generation_config.eos_token_id
        ends = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ends.add(self.tokenizer.eos_token_id)
        return ends

    @property
    def model(self):
        return self.peft if self.peft is not None else self.base

    def hold(self, adapter: AdapterSource, fetch: Callable[[AdapterSource], Path]) -> None:
        """Make `adapter` resident (loading it on first use) and the most recently used; evict beyond capacity."""
        if adapter.name in self.adapters:
            self.adapters.move_to_end(adapter.name)
            return
        folder = fetch(adapter)
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.base, folder, adapter_name=adapter.name).eval()
        else:
            self.peft.load_adapter(folder, adapter_name=adapter.name)
        self.adapters[adapter.name] = None
        log.info("adapter %s loaded on %s (%d held)", adapter.name, self.model_id, len(self.adapters))
        while len(self.adapters) > self.capacity:
            evicted, _ = self.adapters.popitem(last=False)
            self.peft.delete_adapter(evicted)
            log.info("adapter %s evicted from %s (least recently used)", evicted, self.model_id)

    def forward_options(self, names: list[str]):
        """How to run a batch whose rows use adapters `names`: one adapter (or none) for all rows runs PEFT's
        ordinary path, exactly as `PeftModel.generate` would; a mix passes `adapter_names` per row."""
        if self.peft is None:
            return _Plain()
        if len(set(names)) == 1:
            if names[0] == BASE:
                return _Disabled(self.peft)
            self.peft.set_adapter(names[0])
            return _Plain()
        return _Plain(adapter_names=names)


class _Plain:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __enter__(self) -> dict:
        return self.kwargs

    def __exit__(self, *exc) -> None:
        return None


class _Disabled:
    def __init__(self, peft):
        self.context = peft.disable_adapter()

    def __enter__(self) -> dict:
        self.context.__enter__()
        return {}

    def __exit__(self, *exc) -> None:
        self.context.__exit__(*exc)


class Engine:
    """The bases this worker holds, the request queue, and the thread that decodes."""

    def __init__(
        self,
        locate_base: Callable[[str], Path],
        fetch_adapter: Callable[[AdapterSource], Path],
        quantization: str = "nf4",
        adapters_per_base: int = 8,
        max_batch: int = 8,
    ):
        self.locate_base, self.fetch_adapter = locate_base, fetch_adapter
        self.quantization, self.capacity, self.max_batch = quantization, adapters_per_base, max_batch
        self.bases: dict[str, LoadedBase] = {}
        self.pending: collections.deque[Request] = collections.deque()
        self.wakeup = threading.Condition()
        self.in_flight = 0
        self.lock = threading.Lock()  # loading bases and adapters, against concurrent `describe`
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="tunequeue-decoder")
        self.thread.start()

    # what the server calls

    def base(self, model_id: str) -> LoadedBase:
        with self.lock:
            if model_id not in self.bases:
                started = time.monotonic()
                self.bases[model_id] = LoadedBase(
                    model_id, self.locate_base(model_id), self.quantization, self.capacity
                )
                log.info("base %s loaded (%s) in %.1f s", model_id, self.quantization, time.monotonic() - started)
            return self.bases[model_id]

    def submit(self, request: Request) -> None:
        with self.wakeup:
            self.pending.append(request)
            self.in_flight += 1
            self.wakeup.notify()

    def describe(self) -> dict:
        with self.lock:
            bases = {model_id: list(b.adapters) for model_id, b in self.bases.items()}
        return {"bases": bases, "in_flight": self.in_flight, "quantization": self.quantization}

    def stop(self) -> None:
        with self.wakeup:
            self._stop = True
            self.wakeup.notify()

    # the decoding thread

    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while not self.pending and not self._stop:
                    self.wakeup.wait()
                if self._stop:
                    return
                batch = self._take_batch()
            try:
                self._run(batch)
            except Exception as exc:  # one bad batch must not stop the worker; its requests get the error
                log.exception("decoding failed")
                for request in batch:
                    request.emit({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
            finally:
                with self.wakeup:
                    self.in_flight -= len(batch)

    def _take_batch(self) -> list[Request]:
        """The oldest waiting request, and those after it for the same base while the rows and the adapters fit."""
        first = self.pending.popleft()
        batch, rows, adapters = [first], first.n, {first.adapter.name} if first.adapter else set()
        for request in list(self.pending):
            names = adapters | ({request.adapter.name} if request.adapter else set())
            if request.base != first.base or rows + request.n > self.max_batch or len(names) > self.capacity:
                continue
            self.pending.remove(request)
            batch.append(request)
            rows, adapters = rows + request.n, names
        return batch

    def _run(self, batch: list[Request]) -> None:
        batch = [r for r in batch if not r.cancelled.is_set()]
        if not batch:
            return
        loaded = self.base(batch[0].base)
        with self.lock:
            for request in batch:
                if request.adapter is not None:
                    loaded.hold(request.adapter, self.fetch_adapter)
        rows: list[tuple[Request, int, Sequence]] = []
        for request in batch:
            request.emit({"type": "start", "prompt_tokens": len(request.prompt)})
            for index in range(request.n):
                seed = None if request.sampling.seed is None else request.sampling.seed + index
                sequence = Sequence(request.prompt, request.sampling, _decoder(loaded.tokenizer), loaded.eos, seed)
                rows.append((request, index, sequence))
        names = [r.adapter.name if r.adapter else BASE for r, _, _ in rows]
        with loaded.forward_options(names) as options:
            decode_rows(loaded, rows, options)


def _decoder(tokenizer) -> Callable[[list[int]], str]:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@torch.inference_mode()
def decode_rows(loaded: LoadedBase, rows: list[tuple[Request, int, Sequence]], options: dict) -> None:
    """Prefill every row (left-padded), then one forward per new token for the whole batch until every row
    has ended or its request was cancelled. Each row's text goes to its request as it is released."""
    model, dev = loaded.model, loaded.base.device
    width = max(len(seq.prompt) for _, _, seq in rows)
    ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (_, _, seq) in enumerate(rows):
        ids[i, width - len(seq.prompt) :] = torch.tensor(seq.prompt)
        mask[i, width - len(seq.prompt) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **options)
    cache = out.cache
    while True:
        logits = out.logits[:, -1, :]
        step = torch.full((len(rows), 1), loaded.pad_id, dtype=torch.long)
        for i, (request, index, seq) in enumerate(rows):
            if seq.done or request.cancelled.is_set():
                continue
            token = choose(logits[i], seq.sampling, seq.generator)
            step[i, 0] = token
            text = seq.add(token)
            if text:
                request.emit({"type": "text", "index": index, "text": text})
            if seq.done:
                request.emit({"type": "end", "index": index, "finish_reason": seq.finish_reason, "tokens": seq.tokens})
        if all(seq.done or request.cancelled.is_set() for request, _, seq in rows):
            for _, index, seq in rows:
                if not seq.done:
                    log.info("request cancelled (client gone) after %d tokens of choice %d", len(seq.tokens), index)
            return
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=dev)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=step.to(dev),
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            **options,
        )
        cache = out.cache


def fetch_adapter_to(
    cache_dir: Path, download: Callable[[str, Path, str | None], None]
) -> Callable[[AdapterSource], Path]:
    """An adapter's zip from storage, checked against its sha256 and unpacked once under `cache_dir`."""

    def fetch(adapter: AdapterSource) -> Path:
        folder = cache_dir / adapter.name / (adapter.sha256 or "unchecked")
        if (folder / "adapter_config.json").is_file():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        archive = folder.with_suffix(".zip")
        download(adapter.key, archive, adapter.sha256)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(folder)
        archive.unlink()
        return folder

    return fetch
