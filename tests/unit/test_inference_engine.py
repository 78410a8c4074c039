"""The inference engine on the tiny random Llama under real NF4: greedy output equal to plain transformers + peft,
adapters unmerged on one base copy with an LRU, mixed-adapter batches, sampling, stops and cancellation."""

import queue
import threading
from pathlib import Path

import pytest
import torch

from worker.inference.decoding import Sampling, Sequence
from worker.inference.engine import AdapterSource, Engine, Request
from worker.training.model import compute_dtype, contiguous_input, quantization_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PROMPT = [{"role": "user", "content": "Name a colour."}]


def random_adapter(tiny_model: Path, target: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    torch.manual_seed(seed)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.5)  # large enough to change the greedy path
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: random_adapter(tiny_model, root / name, seed)
        for seed, name in enumerate(["ftjob-a", "ftjob-b", "ftjob-c"])
    }


@pytest.fixture(scope="module")
def engine(tiny_model, adapters):
    engine = Engine(lambda _: tiny_model, lambda a: adapters[a.name], quantization="nf4", adapters_per_base=2)
    yield engine
    engine.stop()


def source(name: str) -> AdapterSource:
    return AdapterSource(name=name, key=f"{name}/adapter.zip", sha256=None)


def prompt_ids(tiny_model: Path, messages=PROMPT) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def request(ids, adapter: str | None, **sampling) -> tuple[Request, "queue.Queue[dict]"]:
    events: queue.Queue[dict] = queue.Queue()
    settings = {"max_tokens": 12, "temperature": 0.0, **sampling}
    n = settings.pop("n", 1)
    return Request("tiny-llama", source(adapter) if adapter else None, ids, Sampling(**settings), n, events.put), events


def collect(events: "queue.Queue[dict]", n: int = 1, timeout: float = 120) -> dict[int, dict]:
    """Each choice's text, finish reason and tokens, once all `n` have ended."""
    choices: dict[int, dict] = {}
    while sum(1 for c in choices.values() if "finish_reason" in c) < n:
        event = events.get(timeout=timeout)
        assert event["type"] != "error", event
        if event["type"] in ("text", "end"):
            choice = choices.setdefault(event["index"], {"text": ""})
            choice["text"] += event.get("text", "")
            if event["type"] == "end":
                choice.update(finish_reason=event["finish_reason"], tokens=event["tokens"])
    return choices


def run(engine: Engine, *requests: tuple[Request, "queue.Queue[dict]"]) -> list[dict[int, dict]]:
    """Submit together (one batch when they fit) and wait for all."""
    with engine.wakeup:  # held so that the decoding thread sees them all at once
        for r, _ in requests:
            engine.pending.append(r)
            engine.in_flight += 1
        engine.wakeup.notify()
    return [collect(events, r.n) for r, events in requests]


def reference_greedy(tiny_model: Path, adapter: Path | None, ids: list[int], max_new_tokens: int = 12) -> list[int]:
    """What a user gets from plain transformers + peft on the same NF4 base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, quantization_config=quantization_config("nf4"), dtype=compute_dtype()
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    inputs = torch.tensor([ids])
    out = model.eval().generate(
        inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, len(ids) :].tolist()


def test_greedy_output_equals_plain_transformers_and_peft(engine, tiny_model, adapters):
    ids = prompt_ids(tiny_model)
    for name in ["ftjob-a", None]:
        [choices] = run(engine, request(ids, name))
        expected = reference_greedy(tiny_model, adapters[name] if name else None, ids)
        assert choices[0]["tokens"] == expected, name


def test_one_base_copy_serves_two_adapters_and_the_lru_evicts_the_oldest(engine, tiny_model):
    ids = prompt_ids(tiny_model)
    loaded = engine.base("tiny-llama")
    base_bytes = sum(p.numel() * p.element_size() for p in loaded.base.parameters())
    run(engine, request(ids, "ftjob-a"))
    run(engine, request(ids, "ftjob-b"))
    held = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert list(engine.bases) == ["tiny-llama"] and list(loaded.adapters) == ["ftjob-a", "ftjob-b"]
    # Its prefill's strided last position reaches the output layer contiguous (tests/unit/test_comparison.py).
    assert contiguous_input in loaded.base.get_output_embeddings()._forward_pre_hooks.values()
    assert held - base_bytes < 0.1 * base_bytes  # the second fine-tuned model costs its LoRA matrices only
    run(engine, request(ids, "ftjob-a"))  # a is now the most recently used
    run(engine, request(ids, "ftjob-c"))
    assert list(loaded.adapters) == ["ftjob-a", "ftjob-c"]
    assert set(loaded.peft.peft_config) == {"ftjob-a", "ftjob-c"}


def test_a_mixed_batch_gives_each_row_its_own_adapter(engine, tiny_model):
    ids = prompt_ids(tiny_model)
    alone = {name: run(engine, request(ids, name))[0][0]["tokens"] for name in ["ftjob-a", "ftjob-b", None]}
    assert len({tuple(t) for t in alone.values()}) == 3  # the adapters do change the answer
    together = run(engine, request(ids, "ftjob-a"), request(ids, "ftjob-b"), request(ids, None))
    assert [c[0]["tokens"] for c in together] == list(alone.values())


def test_rows_of_different_lengths_decode_as_they_would_alone(engine, tiny_model):
    short, long = (
        prompt_ids(tiny_model),
        prompt_ids(tiny_model, [{"role": "user", "content": "Name three colours of the sea."}]),
    )
    alone = [run(engine, request(ids, "ftjob-a"))[0][0]["tokens"] for ids in (short, long)]
    together = run(engine, request(short, "ftjob-a"), request(long, "ftjob-a"))
    assert [c[0]["tokens"] for c in together] == alone


def test_sampling_with_a_seed_repeats_and_n_gives_distinct_choices(engine, tiny_model):
    ids = prompt_ids(tiny_model)
    first = run(engine, request(ids, None, temperature=1.0, top_p=0.9, seed=7, n=3))[0]
    again = run(engine, request(ids, None, temperature=1.0, top_p=0.9, seed=7, n=3))[0]
    assert [first[i]["tokens"] for i in range(3)] == [again[i]["tokens"] for i in range(3)]
    assert len({tuple(first[i]["tokens"]) for i in range(3)}) > 1


def test_a_cancelled_request_stops_decoding(engine, tiny_model):
    r, events = request(prompt_ids(tiny_model), None, max_tokens=10_000)
    engine.submit(r)
    assert events.get(timeout=120)["type"] == "start"
    events.get(timeout=60)  # decoding has begun
    r.cancelled.set()
    deadline = threading.Event()
    for _ in range(100):
        if engine.in_flight == 0:
            break
        deadline.wait(0.05)
    assert engine.in_flight == 0


class FakeTokens:
    """Token ids that decode to fixed strings, to test text release in isolation."""

    pieces = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\ufffd"}

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_text_is_released_without_its_stop_string_and_ends_at_the_stop():
    seq = Sequence([0], Sampling(max_tokens=10, stop=("world",)), FakeTokens().decode, eos={9}, seed=None)
    released = [seq.add(t) for t in (1, 2, 3, 4)]
    assert "".join(released) == "Hello " and seq.finish_reason == "stop"


def test_end_of_turn_and_length_set_the_finish_reason():
    decode = FakeTokens().decode
    seq = Sequence([0], Sampling(max_tokens=10), decode, eos={9}, seed=None)
    assert [seq.add(t) for t in (1, 2, 9)] == ["Hel", "lo", ""] and seq.finish_reason == "stop"
    seq = Sequence([0], Sampling(max_tokens=2), decode, eos={9}, seed=None)
    assert "".join(seq.add(t) for t in (1, 2)) == "Hello" and seq.finish_reason == "length"
    seq = Sequence([0], Sampling(max_tokens=5), decode, eos={9}, seed=None)
    assert seq.add(6) == "" and seq.add(5) == "\ufffd!"  # a cut character waits for the next token


@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_other_base_precisions_serve_the_same_greedy_tokens_as_plain_transformers(tiny_model, adapters, quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = Engine(lambda _: tiny_model, lambda a: adapters[a.name], quantization=quantization)
    try:
        ids = prompt_ids(tiny_model)
        [choices] = run(engine, request(ids, "ftjob-b"))
    finally:
        engine.stop()
    config = quantization_config(quantization) if quantization != "none" else None
    extra = {"quantization_config": config} if config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=compute_dtype(), **extra)
    model = PeftModel.from_pretrained(model, adapters["ftjob-b"]).eval()
    inputs = torch.tensor([ids])
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=12, do_sample=False)
    assert choices[0]["tokens"] == out[0, len(ids) :].tolist()
