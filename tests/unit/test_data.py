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
