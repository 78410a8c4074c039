"""The LM head only where labels are: the same loss, accuracy and gradients as the logits at every position."""

import pytest
import torch

from shared.datasets.tokenization import ChatTokenizer
from shared.datasets.validation import CHAT
from tests.support import chat, tiny_lora
from worker.training.data import IGNORE_INDEX, collate, collate_packed, masked
from worker.training.evaluation import labelled_logits, token_loss_sum


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    tokenizer = ChatTokenizer(tokenizer_dir)
    return tokenizer, [tokenizer.encode(chat("q" * n, "answer " * (n % 5 + 1)), CHAT, 128) for n in (3, 40, 7, 90)]


@pytest.fixture(scope="module")
def lora_model(tiny_model):
    """The tiny Llama (tied embeddings) in float32 under PEFT, its LoRA B non-zero so every path carries gradient."""
    model = tiny_lora(tiny_model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as SmolLM2
    return model


def every_position(model, inputs):
    """The reference: logits at every position, the shifted cross-entropy over the labelled ones."""
    labels = inputs["labels"]
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    shifted, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shifted, target, ignore_index=IGNORE_INDEX, reduction="sum")
    keep = target != IGNORE_INDEX
    return loss, int((shifted.argmax(-1)[keep] == target[keep]).sum()), int(keep.sum())


def lora_gradients(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("packed", [False, True])
def test_loss_accuracy_and_gradients_match_the_full_head(lora_model, batch, packed):
    tokenizer, examples = batch
    inputs = collate_packed(examples, tokenizer.pad_id, 128) if packed else collate(examples, tokenizer.pad_id)
    lora_model.zero_grad(set_to_none=True)
    reference, reference_correct, count = every_position(lora_model, inputs)
    reference.backward()
    reference_grads = lora_gradients(lora_model)

    logits, targets = labelled_logits(lora_model, inputs)
    loss, correct = token_loss_sum(logits, targets)
    loss.backward()

    assert logits.shape == (count, lora_model.config.vocab_size) and count < inputs["input_ids"].numel() / 2
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert correct == reference_correct
    for got, want in zip(lora_gradients(lora_model), reference_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not lora_model.get_output_embeddings()._forward_pre_hooks  # the hook is gone after the forward


def test_no_label_gives_zero_with_a_gradient(lora_model, batch):
    """A DeepSpeed rank whose share of a batch is empty trains on one fully masked example: zero loss that still
    backpropagates through the whole model (so every rank takes part in the collectives)."""
    tokenizer, examples = batch
    lora_model.zero_grad(set_to_none=True)
    logits, targets = labelled_logits(lora_model, collate([masked(examples[0])], tokenizer.pad_id))
    loss, correct = token_loss_sum(logits, targets)
    loss.backward()
    assert logits.shape[0] == 0 and loss.item() == 0.0 and correct == 0
    assert all(g.abs().max() == 0 for g in lora_gradients(lora_model))


def test_micro_batches_take_the_same_step_as_the_whole_batch(tiny_model, batch):
    """Gradients accumulated over micro-batches of 64 tokens (or one longer example): the same loss, accuracy and
    updated weights as one forward over the whole packed batch (float32, no dropout: only the sums' order differs)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.training.config import TrainingConfig
    from worker.training.data import Collator
    from worker.training.engine import LocalEngine, micro_batches

    tokenizer, examples = batch
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    collate = Collator(tokenizer.pad_id, True, torch.device("cpu"))
    results, weights = {}, {}
    for budget in (0, 64):
        config = TrainingConfig(base_model_path="m", train_file="t", learning_rate=1e-2, micro_batch_tokens=budget)
        engine = LocalEngine(copy.deepcopy(model), config, collate, total_steps=4)
        results[budget] = engine.step(examples)
        weights[budget] = [p.detach() for p in engine.model.parameters() if p.requires_grad]
    assert len(micro_batches(examples, 64)) > 1 and len(micro_batches(examples, 0)) == 1
    assert results[64].loss == pytest.approx(results[0].loss, rel=1e-5)
    assert results[64].token_accuracy == results[0].token_accuracy
    assert results[64].grad_norm == pytest.approx(results[0].grad_norm, rel=1e-4)
    for got, want in zip(weights[64], weights[0], strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
