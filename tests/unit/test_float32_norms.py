"""Under a bf16 compute dtype the norm layers keep float32 weights and compute in float32, rounding once at their
output (`worker.training.model.norms_in_float32`), on a tiny random Llama with real NF4. bf16 is forced where the
CPU lacks it; the arithmetic is the same, only slower."""

import pytest
import torch

from worker.training import model as recipe_model


@pytest.fixture
def bf16(monkeypatch):
    monkeypatch.setattr(recipe_model, "compute_dtype", lambda: torch.bfloat16)


def norms_of(model) -> list:
    return [module for module in model.modules() if recipe_model.is_norm(module)]


def test_norms_hold_float32_weights_and_round_once(tiny_model, bf16):
    import bitsandbytes as bnb

    model = recipe_model.load_base_model(tiny_model)
    norms = norms_of(model)
    assert len(norms) == 2 * model.config.num_hidden_layers + 1  # two per decoder layer and the final one
    assert all(norm.weight.dtype == torch.float32 for norm in norms)
    # Everything else stays as loaded: 4-bit weights packed, the embeddings in bf16.
    assert all(isinstance(m.weight, bnb.nn.Params4bit) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16

    norm = norms[0]
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))  # weights that bf16 cannot hold exactly
    hidden = torch.randn(2, 5, norm.weight.shape[0], dtype=torch.bfloat16)
    out = norm(hidden)
    x = hidden.float()
    normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    once = (norm.weight * normalised).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, once)
    twice = norm.weight.bfloat16() * normalised.bfloat16()
    assert not torch.equal(out, twice)  # the way a bf16 norm computes: not what the recipe does


def kept_bytes(function) -> int:
    """Bytes of the tensors autograd keeps for the backward of what `function()` computes (each storage once)."""
    kept: dict[int, int] = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(kept.values())


def test_the_fused_norm_gives_autograd_s_gradients_and_keeps_the_input_as_it_came(tiny_model, bf16):
    from worker.training.fused_norm import Float32RMSNorm

    model = recipe_model.load_base_model(tiny_model)
    norm = norms_of(model)[0]
    assert type(norm).__name__ == "LlamaRMSNorm" and not norm._forward_pre_hooks  # fused: its class, no hooks
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(norm.weight.shape[0]))
    hidden = torch.randn(3, 7, weight.shape[0]) * 4
    upstream = torch.randn_like(hidden)

    def autograd_way(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    grads = []
    for compute in (autograd_way, lambda x, w: Float32RMSNorm.apply(x, w, norm.variance_epsilon)):
        x = hidden.clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        out = compute(x, w)
        (out * upstream).sum().backward()
        grads.append((out.detach(), x.grad, w.grad))
    for fused, reference in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)

    # Under bf16 it keeps the bf16 input (and a scale per row) where the hooks' way keeps a float32 copy.
    norm.weight.requires_grad_(False)  # frozen, as under LoRA
    x16 = hidden.bfloat16().requires_grad_()
    fused_kept = kept_bytes(lambda: norm(x16))
    hooked_kept = kept_bytes(lambda: autograd_way(x16.float(), norm.weight).bfloat16())
    assert fused_kept - norm.weight.nbytes < 0.6 * (hooked_kept - norm.weight.nbytes)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_lora_step_trains_through_float32_norms(tiny_model, bf16, checkpointing):
    model = recipe_model.attach_lora(recipe_model.load_base_model(tiny_model), 8, 16, 0.05, ["q_proj", "v_proj"])
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 1000, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(norm.weight.grad is None for norm in norms_of(model))  # frozen, as every base weight


def test_nothing_changes_when_the_recipe_computes_in_float32(tiny_model, monkeypatch):
    monkeypatch.setattr(recipe_model, "compute_dtype", lambda: torch.float32)
    model = recipe_model.load_base_model(tiny_model)
    assert recipe_model.norms_in_float32(model) == 0
    assert all(not norm._forward_pre_hooks for norm in norms_of(model))
