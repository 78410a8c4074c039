"""`make bench-inference`: the inference engine against a plain `transformers` + `peft` `generate` loop, side by
side in one process, on SmolLM2-135M-Instruct quantised to NF4 with LoRA adapters (r=16 on q/k/v/o).

- one at a time: time to first token and tokens/s for the same greedy requests, the engine warm (base and
  adapter already loaded, as on a serving worker) and the plain loop with the model already loaded;
- batched: the same requests submitted at once (two adapters and the bare base mixed), aggregate tokens/s;
- memory: resident memory of the worker process with the base alone, then with one, two and three adapters
  under an LRU of two (one copy of the base; the third evicts the first).

The adapters are freshly initialised (PEFT's default, B = 0): they cost exactly what a trained adapter costs,
and leave the greedy answers equal to the base's, so both sides generate the same tokens."""

import argparse
import json
import queue
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.run import ROOT, base_model
from benchmarks.warm_start import cpu_name
from worker.inference.decoding import Sampling
from worker.inference.engine import AdapterSource, Engine, Request
from worker.inference.server import memory
from worker.training.model import compute_dtype, quantization_config


def prompts(count: int) -> list[str]:
    lines = (ROOT / "tunequeue/sample/heldout.jsonl").read_text().splitlines()
    return [json.loads(line)["messages"][0]["content"] for line in lines[:count]]


def make_adapter(base: Path, target: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    get_peft_model(model, config).save_pretrained(target)
    return target


class FirstToken:
    """A `generate` streamer that notes when the first new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, _value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def plain_loop(base: Path, adapter: Path, questions: list[str], max_tokens: int) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    nf4 = quantization_config("nf4")
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4, dtype=compute_dtype())
    model = PeftModel.from_pretrained(model, adapter).eval()
    firsts, tokens = [], 0
    for warm_up, question in [(True, questions[0])] + [(False, q) for q in questions]:
        if not warm_up and not firsts and tokens == 0:
            started = time.perf_counter()
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        streamer, sent = FirstToken(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
        if warm_up:  # as warm as the engine: the first call pays one-off costs
            continue
        firsts.append((streamer.first or time.perf_counter()) - sent)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    elapsed = time.perf_counter() - started
    return {"ttft_ms": 1000 * sum(firsts) / len(firsts), "tokens": tokens, "tok_s": tokens / elapsed}


def ask(engine: Engine, ids: list[int], adapter: str | None, max_tokens: int) -> tuple[Request, "queue.Queue[tuple]"]:
    events: queue.Queue[tuple] = queue.Queue()
    source = AdapterSource(adapter, adapter, None) if adapter else None
    request = Request(
        "smollm2", source, ids, Sampling(max_tokens=max_tokens, temperature=0.0), 1,
        lambda e: events.put((time.perf_counter(), e)),
    )  # fmt: skip
    return request, events


def wait(events: "queue.Queue[tuple]", sent: float) -> tuple[float, int]:
    """Time to the first token's event (text, or the end if the first token ended it), and tokens generated."""
    first = None
    while True:
        at, event = events.get(timeout=600)
        if event["type"] in ("text", "end") and first is None:
            first = at - sent
        if event["type"] == "end":
            return first or 0.0, len(event["tokens"])
        assert event["type"] != "error", event


def engine_runs(base: Path, adapters: dict[str, Path], questions: list[str], max_tokens: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for q in questions
    ]
    rss = {"before": memory().get("rss_bytes", 0)}
    engine = Engine(lambda _: base, lambda a: adapters[a.name], quantization="nf4", adapters_per_base=2, max_batch=16)
    loaded = engine.base("smollm2")
    rss["base"] = memory().get("rss_bytes", 0)
    results = {}
    steps = [("one adapter", ["a"]), ("two adapters", ["a", "b"]), ("three adapters, LRU of two", ["a", "b", "c"])]
    for label, names in steps:
        for name in names:
            request, events = ask(engine, ids[0], name, 2)
            engine.submit(request)
            wait(events, time.perf_counter())
        rss[label] = memory().get("rss_bytes", 0)
        results.setdefault("held", {})[label] = list(loaded.adapters)

    firsts, tokens, started = [], 0, time.perf_counter()  # warm, one at a time, adapter "a"
    for prompt in ids:
        request, events = ask(engine, prompt, "a", max_tokens)
        sent = time.perf_counter()
        engine.submit(request)
        first, count = wait(events, sent)
        firsts.append(first)
        tokens += count
    results["one_at_a_time"] = {
        "ttft_ms": 1000 * sum(firsts) / len(firsts), "tokens": tokens, "tok_s": tokens / (time.perf_counter() - started)
    }  # fmt: skip

    names = ["a", "b", None]  # two fine-tuned models and the bare base, mixed in one batch
    pending = [ask(engine, prompt, names[i % 3], max_tokens) for i, prompt in enumerate(ids)]
    started = time.perf_counter()
    with engine.wakeup:  # all waiting when the decoding thread looks: one batch
        for request, _ in pending:
            engine.pending.append(request)
            engine.in_flight += 1
        engine.wakeup.notify()
    outcomes = [wait(events, started) for _, events in pending]
    elapsed = time.perf_counter() - started
    results["batched"] = {
        "ttft_ms": 1000 * sum(f for f, _ in outcomes) / len(outcomes),
        "tokens": sum(c for _, c in outcomes),
        "tok_s": sum(c for _, c in outcomes) / elapsed,
    }
    results["rss_mib"] = {k: round(v / 2**20) for k, v in rss.items()}
    results["base_parameter_mib"] = sum(p.numel() * p.element_size() for p in loaded.base.parameters()) / 2**20
    engine.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = base_model()
    questions = prompts(args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        adapters = {name: make_adapter(base, Path(scratch) / name) for name in "abc"}
        print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; compute dtype {compute_dtype()}")
        engine = engine_runs(base, adapters, questions, args.max_tokens)
        plain = plain_loop(base, adapters["a"], questions, args.max_tokens)
    print(f"\n{args.requests} requests, greedy, up to {args.max_tokens} tokens each, SmolLM2-135M NF4 + LoRA r=16")
    print("| run | time to first token | tokens | tokens/s | vs plain generate |")
    print("|---|---|---|---|---|")
    for label, row in [
        ("plain transformers + peft generate, one at a time", plain),
        ("engine, one at a time (warm)", engine["one_at_a_time"]),
        (f"engine, {args.requests} requests batched (2 adapters + base)", engine["batched"]),
    ]:
        ratio = row["tok_s"] / plain["tok_s"]
        print(f"| {label} | {row['ttft_ms']:.0f} ms | {row['tokens']} | {row['tok_s']:.1f} | {ratio:.2f}x |")
    print(f"\nresident memory (MiB): {engine['rss_mib']}; NF4 base parameters {engine['base_parameter_mib']:.1f} MiB")
    print(f"adapters held: {engine['held']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
