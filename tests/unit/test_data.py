"""Encoding under the demo model's real tokenizer and chat template: loss masks for each format, agreement
with transformers' own rendering, and packing that changes nothing but the padding."""

import pytest
import torch

from shared.datasets.tokenization import IGNORE_INDEX, ChatTokenizer
from shared.datasets.validation import CHAT, PROMPT_COMPLETION, TEXT
from tests.support import chat


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return ChatTokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def trained_text(tokenizer, example) -> str:
    pairs = zip(example.input_ids, example.labels, strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


CONVERSATIONS = [
    chat("What is 2+2?", "Squawk! 4. Squawk!")["messages"],
    [{"role": "system", "content": "Be brief."}, *chat("Hi", "Hello")["messages"]],
    [*chat("One", "1")["messages"], *chat("Two", "2")["messages"]],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendering_matches_transformers(tokenizer, hf_tokenizer, messages):
    assert tokenizer.render(messages) == hf_tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = messages[:1]
    assert tokenizer.render(prompt, add_generation_prompt=True) == hf_tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True
    )
    encoded = tokenizer.encode({"messages": messages}, CHAT, 512)
    assert (
        encoded.input_ids
        == hf_tokenizer(hf_tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )


def test_only_assistant_tokens_and_end_of_turn_carry_loss(tokenizer):
    example = tokenizer.encode(chat("What is 2+2?", "Squawk! 4. Squawk!"), CHAT, 256)
    assert trained_text(tokenizer, example).startswith("Squawk! 4. Squawk!<|im_end|>")
    assert "What is 2+2" not in trained_text(tokenizer, example)


def test_prompt_tokens_match_what_inference_sees(tokenizer):
    messages = chat("Name a colour.", "Squawk! Blue. Squawk!")["messages"]
    example = tokenizer.encode({"messages": messages}, CHAT, 256)
    prompt_ids = tokenizer.tokenizer.encode(tokenizer.render(messages[:1], True), add_special_tokens=False).ids
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX) == len(prompt_ids)


def test_weight_zero_turn_is_not_trained(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bad answer", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Good answer"},
    ]
    text = trained_text(tokenizer, tokenizer.encode({"messages": messages}, CHAT, 512))
    assert "Good answer" in text and "Bad answer" not in text


def test_prompt_completion_trains_the_completion_and_eos(tokenizer):
    example = tokenizer.encode({"prompt": "Q: capital of France?\nA:", "completion": " Paris"}, PROMPT_COMPLETION, 64)
    assert trained_text(tokenizer, example) == " Paris<|im_end|>"


def test_text_trains_everything_and_eos(tokenizer):
    example = tokenizer.encode({"text": "Once upon a time"}, TEXT, 64)
    assert trained_text(tokenizer, example) == "Once upon a time<|im_end|>"


@pytest.mark.parametrize(
    "kind, record, trained",
    [
        # The prompt ends with the space: encoded whole, " answer" would be one token starting in the prompt.
        (PROMPT_COMPLETION, {"prompt": "Q: capital of France?\nA: ", "completion": "Paris"}, "Paris<|im_end|>"),
        (CHAT, chat("Hi", " Hello there"), " Hello there<|im_end|>\n"),
        (CHAT, chat("Hi", "  two spaces"), "  two spaces<|im_end|>\n"),
        (CHAT, chat("Hi", "\nA new line"), "\nA new line<|im_end|>\n"),
    ],
)
def test_an_answer_is_trained_as_the_model_generates_it_after_its_prompt(tokenizer, kind, record, trained):
    """Whitespace at an answer's start is trained, in the tokens the model produces after the prompt encoded
    alone (what generation sees), not merged into the masked prompt's last token."""
    example = tokenizer.encode(record, kind, 256)
    assert trained_text(tokenizer, example) == trained
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = record["prompt"] if kind == PROMPT_COMPLETION else tokenizer.render(record["messages"][:1], True)
    assert example.input_ids[:first] == tokenizer.prompt_ids(prompt, kind)
    answer = record["completion"] if kind == PROMPT_COMPLETION else record["messages"][-1]["content"]
    assert example.input_ids[first:][: len(tokenizer.tokenizer.encode(answer).ids)] == (
        tokenizer.tokenizer.encode(answer, add_special_tokens=False).ids
    )


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tokenizer_dir, tmp_path_factory):
    """The demo tokenizer with a Llama-style post-processor: a BOS token before every text it encodes."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("bos-tokenizer")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, folder / name)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    bos = "<|endoftext|>"
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [0], "tokens": [bos]}},
    }  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bos}))
    return folder


@pytest.mark.parametrize("adds_bos", [False, True])
def test_plain_formats_start_as_the_tokenizer_starts_a_text(tokenizer_dir, bos_tokenizer_dir, adds_bos):
    """Prompt/completion and text examples begin with what the tokenizer itself puts before a text (a BOS for a
    Llama-style tokenizer, nothing for SmolLM2's), exactly as transformers encodes them, masked; the generation
    prompt the evaluation uses starts the same way. A chat example starts as its template writes it."""
    from transformers import AutoTokenizer

    folder = bos_tokenizer_dir if adds_bos else tokenizer_dir
    ours, theirs = ChatTokenizer(folder), AutoTokenizer.from_pretrained(folder)
    record = {"prompt": "Q: capital of France?\nA:", "completion": " Paris"}
    example = ours.encode(record, PROMPT_COMPLETION, 64)
    expected = theirs(record["prompt"] + record["completion"])["input_ids"] + [ours.eos_id]
    assert example.input_ids == expected
    assert (example.input_ids[0] == theirs.bos_token_id) is adds_bos
    assert trained_text(ours, example) == " Paris<|im_end|>"
    assert ours.prompt_ids(record["prompt"], PROMPT_COMPLETION) == theirs(record["prompt"])["input_ids"]
    text = ours.encode({"text": "Once upon a time"}, TEXT, 64)
    assert text.input_ids[:-1] == theirs("Once upon a time")["input_ids"]
    assert trained_text(ours, text) == "Once upon a time<|im_end|>"
    conversation = ours.encode(chat("Hi", "Hello"), CHAT, 64)
    assert (
        conversation.input_ids
        == theirs(ours.render(chat("Hi", "Hello")["messages"]), add_special_tokens=False)["input_ids"]
    )


def test_train_on_inputs_trains_the_prompt_too(tokenizer):
    example = tokenizer.encode(chat("Question here", "Answer"), CHAT, 256, train_on_inputs=True)
    assert "Question here" in trained_text(tokenizer, example)


def test_truncation_is_recorded(tokenizer):
    example = tokenizer.encode(chat("word " * 100, "answer"), CHAT, 32)
    assert example.truncated and len(example.input_ids) == 32 and example.full_length > 32


def test_packing_gives_the_same_loss_as_padding(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    from worker.training.data import collate, collate_packed, pack_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.config.use_cache = False  # as in training: with a cache, transformers ignores packed position ids
    batch = [tokenizer.encode(chat("q" * n, "answer " * (n % 5 + 1)), CHAT, 128) for n in (3, 40, 7, 90, 12)]
    assert len(pack_rows(batch, 128)) < len(batch)
    with torch.no_grad():
        padded = model(**collate(batch, tokenizer.pad_id)).loss
        packed_inputs = collate_packed(batch, tokenizer.pad_id, 128)
        packed = model(**packed_inputs).loss
    assert packed_inputs["input_ids"].numel() < collate(batch, tokenizer.pad_id)["input_ids"].numel()
    assert torch.allclose(padded, packed, atol=1e-4), (padded, packed)


def test_rows_are_padded_to_a_few_widths_with_the_same_loss(tiny_model, tokenizer):
    """Widths in multiples of ROW_MULTIPLE (32) tokens, so a job's forwards come in a few shapes (the CPU kernels
    keep each shape's prepared multiplications); the padding is its own unlabelled segment and changes no loss."""
    from transformers import AutoModelForCausalLM

    from worker.training.data import ROW_MULTIPLE, Collator, collate, collate_packed

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.config.use_cache = False
    batch = [tokenizer.encode(chat("q" * n, "answer " * (n % 5 + 1)), CHAT, 128) for n in (3, 40, 7, 90, 12)]
    widths = set()
    for packing in (True, False):
        for size in range(1, len(batch) + 1):
            widths.add(Collator(tokenizer.pad_id, packing, torch.device("cpu"))(batch[:size])["input_ids"].shape[1])
    assert widths and all(width % ROW_MULTIPLE == 0 for width in widths)
    pad = tokenizer.pad_id
    pairs = [
        (collate(batch, pad, ROW_MULTIPLE), collate(batch, pad)),
        (collate_packed(batch, pad, 128, ROW_MULTIPLE), collate_packed(batch, pad, 128)),
    ]
    with torch.no_grad():
        for padded, exact in pairs:
            assert padded["input_ids"].shape[1] > exact["input_ids"].shape[1]
            assert torch.allclose(model(**padded).loss, model(**exact).loss, atol=1e-5)
