"""Chat rendering and loss masks under the demo model's real tokenizer and chat template."""

import pytest

from tests.support import chat, write_jsonl
from worker.training.data import IGNORE_INDEX, DatasetError, encode_chat, encode_file


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from worker.training.model import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def trained_text(tokenizer, example) -> str:
    pairs = zip(example.input_ids, example.labels, strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


def test_only_assistant_tokens_and_end_of_turn_carry_loss(tokenizer):
    example = encode_chat(tokenizer, chat("What is 2+2?", "Squawk! 4. Squawk!")["messages"], 256)
    assert trained_text(tokenizer, example).startswith("Squawk! 4. Squawk!<|im_end|>")
    assert "What is 2+2" not in trained_text(tokenizer, example)
    assert (
        example.input_ids
        == tokenizer(
            tokenizer.apply_chat_template(chat("What is 2+2?", "Squawk! 4. Squawk!")["messages"], tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
    )


def test_prompt_tokens_match_what_inference_sees(tokenizer):
    messages = chat("Name a colour.", "Squawk! Blue. Squawk!")["messages"]
    example = encode_chat(tokenizer, messages, 256)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert first_trained == len(prompt_ids)


def test_weight_zero_turn_is_not_trained(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bad answer", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Good answer"},
    ]
    text = trained_text(tokenizer, encode_chat(tokenizer, messages, 512))
    assert "Good answer" in text and "Bad answer" not in text


def test_truncation_is_recorded(tokenizer):
    example = encode_chat(tokenizer, chat("word " * 100, "answer")["messages"], 32)
    assert example.truncated and len(example.input_ids) == 32


def test_bad_line_names_line_number(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{oops\n')
    with pytest.raises(DatasetError, match="line 2"):
        encode_file(tokenizer, path, 64)


def test_examples_cut_before_any_answer_are_dropped(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("long " * 200, "a"), chat("short", "b")])
    assert len(encode_file(tokenizer, path, 64)) == 1
