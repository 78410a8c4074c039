"""The evaluation every job ends with (`worker.training.comparison`) on a tiny random Llama in NF4 with LoRA: the
prompts taken from validation examples, and both models' greedy answers generated in one batch (left-padded,
the base's rows with the adapter off, 4-bit weights dequantised once) equal to what each model answers to each
prompt on its own."""

import pytest

from shared.datasets.tokenization import ChatTokenizer
from worker.training import comparison
from worker.training.checkpointing import TrainingProgress


def test_prompts_are_what_precedes_the_last_answer(tiny_model):
    tokenizer = ChatTokenizer(tiny_model)
    conversation = {
        "messages": [
            {"role": "system", "content": "You are a parrot."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Squawk!"},
            {"role": "user", "content": "Say 7"},
            {"role": "assistant", "content": "Squawk! 7. Squawk!"},
        ]
    }
    (first,) = comparison.sample_prompts(tokenizer, "chat", [conversation], 3, 512)
    assert first.text == tokenizer.render(conversation["messages"][:4], add_generation_prompt=True)
    assert first.text.startswith("<|im_start|>system\nYou are a parrot.") and "Squawk!<|im_end|>" in first.text
    assert first.text.endswith("<|im_start|>assistant\n") and first.reference == "Squawk! 7. Squawk!"
    assert first.ids == tokenizer.tokenizer.encode(first.text, add_special_tokens=False).ids

    pairs = [{"prompt": f"Q{i}: what?\nA:", "completion": f" answer {i}"} for i in range(5)]
    prompts = comparison.sample_prompts(tokenizer, "prompt_completion", pairs, 3, 512)
    assert [(p.text, p.reference) for p in prompts] == [(f"Q{i}: what?\nA:", f" answer {i}") for i in range(3)]
    assert comparison.sample_prompts(tokenizer, "text", [{"text": "anything"}], 3, 512) == []
    # A prompt longer than the job's max_seq_length is passed over, the next one taken.
    long = {"prompt": "word " * 600, "completion": "x"}
    assert [p.reference for p in comparison.sample_prompts(tokenizer, "prompt_completion", [long, *pairs], 2, 64)] == [
        " answer 0",
        " answer 1",
    ]


@pytest.fixture(scope="module")
def tuned_model(tiny_model):
    """NF4 base + LoRA whose B matrices are not zero: the adapter changes the answers."""
    import torch

    from worker.training.model import attach_lora, load_base_model

    torch.manual_seed(5)
    model = attach_lora(load_base_model(tiny_model, "nf4"), 8, 16, 0.0, ["q_proj", "v_proj"])
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.5)
    return model.eval()


def test_answers_side_by_side_are_each_models_own(tiny_model, tuned_model):
    import bitsandbytes as bnb

    tokenizer = ChatTokenizer(tiny_model)
    records = [
        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "Squawk!"}]}
        for question in ("Say 1", "Tell me about the longest river in the world, please", "Hi")
    ]
    prompts = comparison.sample_prompts(tokenizer, "chat", records, 3, 512)
    assert len({len(p.ids) for p in prompts}) == 3  # the batch is padded

    samples = comparison.side_by_side(tuned_model, tokenizer, prompts, max_new_tokens=8)

    # Each prompt alone, through bitsandbytes' own 4-bit path: the tuned model, then the base (adapter off).
    alone = [comparison.greedy_answers(tuned_model, tokenizer, [p.ids], 8)[0] for p in prompts]
    with tuned_model.disable_adapter():
        base_alone = [comparison.greedy_answers(tuned_model, tokenizer, [p.ids], 8)[0] for p in prompts]
    assert [s["tuned"] for s in samples] == alone
    assert [s["base"] for s in samples] == base_alone
    assert alone != base_alone  # the adapter is in the tuned rows only
    assert [(s["prompt"], s["reference"]) for s in samples] == [(p.text, "Squawk!") for p in prompts]
    # The 4-bit layers are themselves again.
    layers = [m for m in tuned_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any("forward" in vars(layer) for layer in layers)


def test_the_output_layer_gets_the_last_position_in_one_piece(tiny_model, tuned_model):
    """Generation's prefill asks for the last position's logits only, a strided slice of the hidden states, which
    PyTorch's CPU matmul multiplies by a frozen bf16 weight through a copy of that weight per row (with oneDNN's
    bf16 kernels). With the hook the recipe and the serving engine put on the output layer, the same logits come
    without the copies."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from worker.training.model import contiguous_head_input, contiguous_input

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval().requires_grad_(False)
    weight = model.get_output_embeddings().weight
    ids = torch.arange(5, 53).reshape(6, 8)

    def prefill() -> tuple[torch.Tensor, int]:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as run:
            logits = model(input_ids=ids, logits_to_keep=1).logits
        return logits, max(event.cpu_memory_usage for event in run.events())

    strided, largest_before = prefill()
    contiguous_head_input(model)
    logits, largest_after = prefill()
    weight_bytes = weight.numel() * weight.element_size()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # oneDNN's bf16 kernels make the copies; a CPU without
        # them (AVX2 only) multiplies bf16 in a reference kernel, without copies to avoid
        assert largest_before >= ids.shape[0] * weight_bytes  # the copies this is for (pinned torch: see the hook)
    assert largest_after < weight_bytes
    torch.testing.assert_close(logits, strided, rtol=0, atol=0)
    # The recipe's models carry it (the serving engine's too: tests/unit/test_inference_engine.py).
    assert contiguous_input in tuned_model.get_output_embeddings()._forward_pre_hooks.values()


def test_improved_compares_the_losses():
    initial = {"valid_loss": 2.5, "valid_mean_token_accuracy": 0.4}
    adapter = {"selection": "best", "step": 6, "valid_loss": 0.5, "valid_mean_token_accuracy": 0.9}
    evaluation = comparison.build_evaluation(initial, adapter, adapter, 4, [], max_new_tokens=64)
    assert evaluation["base"] == {"loss": 2.5, "token_accuracy": 0.4}
    assert evaluation["tuned"] == {"loss": 0.5, "token_accuracy": 0.9, "step": 6, "selection": "best"}
    assert evaluation["improved"] is True and evaluation["max_new_tokens"] == 64
    worse = comparison.build_evaluation(initial, {**adapter, "valid_loss": 3.0}, adapter, 4, [])
    assert worse["improved"] is False
    nothing = comparison.build_evaluation({}, {"step": 6}, {"selection": "last", "step": 6}, 0, [])
    assert nothing["base"] is None and nothing["tuned"] is None and nothing["improved"] is None
    assert "no validation examples" in comparison.summary(nothing)


class RecordingReporter:
    def __init__(self):
        self.events: list[dict] = []

    def log(self, step: int, metrics: dict) -> None:
        self.events.append({"event": "metrics", "step": step, **metrics})

    def event(self, kind: str, **fields) -> None:
        self.events.append({"event": kind, **fields})


@pytest.mark.parametrize("best_loss, beaten", [(2.9, True), (3.0, False), (3.4, False)])
def test_a_run_whose_evaluations_never_beat_the_base_says_so(best_loss, beaten):
    """The base model's score before the first step is the bar: a best evaluation that does not go under it
    (equal included) gets a `warn` event naming both figures and what to change, and `base_beaten: false`."""
    from worker.training.evaluation import BestValidation
    from worker.training.recipe import TrainingLoop

    loop = TrainingLoop.__new__(TrainingLoop)  # the decision alone: no model, engine or data needed
    loop.reporter = RecordingReporter()
    loop.validation = BestValidation({"step": 8, "valid_loss": best_loss, "valid_mean_token_accuracy": 0.3})
    loop.progress = TrainingProgress(initial={"valid_loss": 3.0, "valid_mean_token_accuracy": 0.2})
    assert loop.base_beaten() is beaten
    warnings = [e for e in loop.reporter.events if e.get("level") == "warn"]
    if beaten:
        assert warnings == []
    else:
        (warning,) = warnings
        assert f"{best_loss:.4f} at step 8" in warning["message"] and "3.0000" in warning["message"]
        assert "learning_rate_multiplier" in warning["message"]
        # The worker reads it as any recipe event, at the level it gives.
        from worker.training.events import RECIPE_EVENT, MessageEvent

        parsed = RECIPE_EVENT.validate_python(warning)
        assert isinstance(parsed, MessageEvent) and parsed.level == "warn"
    loop.progress = TrainingProgress()  # no validation set: nothing to compare
    assert loop.base_beaten() is None
    evaluation = comparison.build_evaluation({}, {}, {"selection": "last", "step": 1}, 0, [], base_beaten=None)
    assert evaluation["base_beaten"] is None
