"""The output layer a chunk of labelled rows at a time: the same loss, accuracy and gradients as the whole
labelled logits at once, with no logits kept for the backward pass."""

import pytest
import torch

from shared.datasets.tokenization import ChatTokenizer
from shared.datasets.validation import CHAT
from tests.support import chat, tiny_lora
from worker.training import evaluation
from worker.training.data import collate, collate_packed, masked
from worker.training.evaluation import labelled_logits, labelled_loss_sum, token_loss_sum


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    tokenizer = ChatTokenizer(tokenizer_dir)
    return tokenizer, [tokenizer.encode(chat("q" * n, "answer " * (n % 5 + 1)), CHAT, 128) for n in (3, 40, 7, 90)]


def lora_model(tiny_model, dtype: torch.dtype):
    return tiny_lora(tiny_model, dtype)


def loss_and_gradients(model, inputs, loss_of) -> tuple[float, int, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, correct = loss_of(model, inputs)
    (loss / 7).backward()  # a scale, as the engine's division by the batch's token count
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return loss.item(), correct, grads


def whole_logits(model, inputs):
    return token_loss_sum(*labelled_logits(model, inputs))


@pytest.mark.parametrize("packed", [False, True])
def test_chunks_match_the_whole_labelled_logits(tiny_model, batch, packed, monkeypatch):
    monkeypatch.setattr(evaluation, "HEAD_CHUNK_ROWS", 16)  # several chunks, the last one short
    tokenizer, examples = batch
    inputs = collate_packed(examples, tokenizer.pad_id, 128) if packed else collate(examples, tokenizer.pad_id)
    model = lora_model(tiny_model, torch.float32)
    assert evaluation.frozen_linear(model.get_output_embeddings())
    want_loss, want_correct, want_grads = loss_and_gradients(model, inputs, whole_logits)
    got_loss, got_correct, got_grads = loss_and_gradients(model, inputs, labelled_loss_sum)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert got_correct == want_correct
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_bf16_stays_as_close_as_the_dtype_allows(tiny_model, batch):
    tokenizer, examples = batch
    inputs = collate(examples, tokenizer.pad_id)
    model = lora_model(tiny_model, torch.bfloat16)
    want_loss, want_correct, want_grads = loss_and_gradients(model, inputs, whole_logits)
    got_loss, got_correct, got_grads = loss_and_gradients(model, inputs, labelled_loss_sum)
    assert got_loss == pytest.approx(want_loss, rel=1e-3)
    assert abs(got_correct - want_correct) <= 1
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got.float(), want.float(), rtol=5e-2, atol=5e-3 * float(want.abs().max()))


def test_no_label_gives_zero_with_a_gradient(tiny_model, batch):
    tokenizer, examples = batch
    model = lora_model(tiny_model, torch.float32)
    inputs = collate([masked(examples[0])], tokenizer.pad_id)
    loss, correct, grads = loss_and_gradients(model, inputs, labelled_loss_sum)
    assert loss == 0.0 and correct == 0
    assert all(g.abs().max() == 0 for g in grads)


def test_a_trained_head_takes_the_whole_logits(tiny_model, batch):
    tokenizer, examples = batch
    model = lora_model(tiny_model, torch.float32)
    model.get_output_embeddings().weight.requires_grad_(True)
    assert not evaluation.frozen_linear(model.get_output_embeddings())
    inputs = collate(examples, tokenizer.pad_id)
    want_loss, _, want_grads = loss_and_gradients(model, inputs, whole_logits)
    got_loss, _, got_grads = loss_and_gradients(model, inputs, labelled_loss_sum)
    assert got_loss == want_loss
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.equal(got, want)
