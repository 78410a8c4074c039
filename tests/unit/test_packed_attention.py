"""Attention one packed sequence at a time: the sequences read off transformers' block-diagonal causal mask
(any other mask left to SDPA), the same logits and gradients as SDPA with the mask, which are those of each
example run alone, and so the same loss with a whole micro-batch in one row."""

import pytest
import torch

from shared.datasets.tokenization import CHAT, ChatTokenizer
from tests.support import chat, tiny_lora
from worker.training import packed_attention
from worker.training.data import Collator, collate, collate_packed, pack_rows
from worker.training.packed_attention import per_sequence_attention, sequence_lengths, use_packed_attention


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return ChatTokenizer(tokenizer_dir)


def block_mask(rows: list[list[int]]) -> torch.Tensor:
    n = sum(rows[0])
    mask = torch.zeros(len(rows), 1, n, n, dtype=torch.bool)
    for r, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            mask[r, 0, start : start + length, start : start + length] = torch.ones(length, length).tril().bool()
            start += length
    return mask


def test_sequences_are_read_off_a_block_diagonal_causal_mask_and_nothing_else():
    assert sequence_lengths(block_mask([[5, 3, 8], [16]])) == [[5, 3, 8], [16]]
    assert sequence_lengths(block_mask([[1] * 6])) == [[1] * 6]
    leaky = block_mask([[5, 3, 8]])
    leaky[0, 0, 9, 2] = True  # one query sees a key of the sequence before
    assert sequence_lengths(leaky) is None
    left_padded = block_mask([[16]])
    left_padded[0, 0, :, :4] = False  # padding on the left: not block-diagonal causal
    assert sequence_lengths(left_padded) is None
    assert sequence_lengths(block_mask([[4, 4]]).float()) is None  # an additive mask: left to SDPA
    mask = block_mask([[4, 4]])
    assert sequence_lengths(mask) == [[4, 4]]
    mask[0, 0, 4, 3] = True  # the same tensor changed in place: read again, not taken from the last call
    assert sequence_lengths(mask) is None


def lora_models(tiny_model, dtype):
    """Two identical LoRA models of the tiny Llama (grouped-query attention), one attending per sequence."""
    plain, packed = tiny_lora(tiny_model, dtype), tiny_lora(tiny_model, dtype)
    assert use_packed_attention(packed)
    assert plain.config._attn_implementation == "sdpa"
    return plain, packed


def gradients_and_logits(model, inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return output.logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_logits_and_gradients_as_sdpa_with_the_mask(tiny_model, tokenizer, dtype, monkeypatch):
    calls, real = [], packed_attention._block_lengths
    monkeypatch.setattr(packed_attention, "_block_lengths", lambda mask: calls.append(real(mask)) or calls[-1])
    plain, packed = lora_models(tiny_model, dtype)
    batch = [tokenizer.encode(chat("q" * n, "answer " * (n % 5 + 1)), CHAT, 128) for n in (3, 40, 7, 90, 12)]
    assert len(pack_rows(batch, 128)) < len(batch)
    inputs = collate_packed(batch, tokenizer.pad_id, 128, multiple=32)  # padding: a sequence of its own
    want_logits, want_grads = gradients_and_logits(plain, inputs)
    got_logits, got_grads = gradients_and_logits(packed, inputs)
    assert calls and all(lengths is not None for lengths in calls), "the packed rows went one sequence at a time"
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert torch.allclose(got_logits.float(), want_logits.float(), **tolerance)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got.float(), want.float(), **tolerance)
    if dtype == torch.float32:  # and each example alone gives the logits its packed positions have
        alone = collate(batch[:1], tokenizer.pad_id)
        with torch.no_grad():
            single = packed(**alone).logits[0]
        row, start = next(
            (r, sum(len(e.input_ids) for e in examples[: examples.index(batch[0])]))
            for r, examples in enumerate(pack_rows(batch, 128))
            if batch[0] in examples
        )
        assert torch.allclose(got_logits[row, start : start + len(batch[0].input_ids)], single, atol=1e-4)


def test_left_padded_generation_goes_to_sdpa_with_the_same_logits(tiny_model, tokenizer):
    plain, packed = lora_models(tiny_model, torch.float32)
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0  # the first prompt is shorter, padded on the left
    plain.eval(), packed.eval()
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=attention_mask).logits
        got = packed(input_ids=ids, attention_mask=attention_mask).logits
        assert torch.equal(got, want)
        generated = packed.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
        expected = plain.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)


def test_one_row_per_batch_gives_the_loss_of_rows_as_wide_as_the_longest_example(tiny_model, tokenizer):
    """With attention example by example, a batch packs into one row (no padding but its rounding to 32 tokens):
    the same loss as rows as wide as the longest example under SDPA's mask, for fewer tokens computed."""
    plain, packed = lora_models(tiny_model, torch.float32)
    assert per_sequence_attention(packed) and not per_sequence_attention(plain)
    batch = [tokenizer.encode(chat("q" * n, "answer " * (n % 5 + 1)), CHAT, 128) for n in (3, 40, 7, 90, 12)]
    rows = Collator(tokenizer.pad_id, True, torch.device("cpu"))(batch)
    one_row = Collator(tokenizer.pad_id, True, torch.device("cpu"), one_row=True)(batch)
    real = sum(len(example.input_ids) for example in batch)
    assert one_row["input_ids"].shape == (1, -(-real // 32) * 32)
    assert one_row["input_ids"].numel() < rows["input_ids"].numel()
    plain.eval(), packed.eval()
    with torch.no_grad():
        assert torch.allclose(packed(**one_row).loss, plain(**rows).loss, rtol=1e-5)
