"""The gated MLP's SiLU(gate) * up in one autograd step: the same output, the gradients autograd gives (in
float32 to rounding; in bf16 closer to the float32 ones than autograd's own), one intermediate-size tensor
per layer less kept for the backward."""

import copy

import pytest
import torch

from tests.support import tiny_lora
from worker.training.gated_mlp import SiluTimesUp, fuse_gated_mlps


def autograd_way(gate, up):
    return torch.nn.functional.silu(gate) * up


def gradients_of(function, gate, up, grad):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = function(gate, up)
    out.backward(grad)
    return out, gate.grad, up.grad


def test_the_fused_step_gives_autograd_s_output_and_gradients():
    torch.manual_seed(0)
    gate, up, grad = (torch.randn(64, 96) * 3 for _ in range(3))
    fused = gradients_of(SiluTimesUp.apply, gate, up, grad)
    plain = gradients_of(autograd_way, gate, up, grad)
    assert torch.equal(fused[0], plain[0])
    for got, want in zip(fused[1:], plain[1:], strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # In bf16 the fused backward rounds once: nearer the float32 gradients than autograd's chain of bf16 steps.
    low = [gradients_of(f, gate.bfloat16(), up.bfloat16(), grad.bfloat16()) for f in (SiluTimesUp.apply, autograd_way)]
    assert torch.equal(low[0][0], low[1][0])
    exact = gradients_of(autograd_way, gate.bfloat16().float(), up.bfloat16().float(), grad.bfloat16().float())
    for index in (1, 2):
        fused_error = (low[0][index].float() - exact[index]).abs().sum()
        assert fused_error <= (low[1][index].float() - exact[index]).abs().sum()


def saved_bytes(model, ids) -> int:
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(seen.values())


def gradients(model, ids) -> list[torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")])
def test_a_lora_model_trains_the_same_through_the_fused_mlps(tiny_model, targets):
    plain, fused = tiny_lora(tiny_model, targets=targets), tiny_lora(tiny_model, targets=targets)
    layers = fused.config.num_hidden_layers
    assert fuse_gated_mlps(fused) == layers
    ids = torch.randint(0, fused.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    for got, want in zip(gradients(fused, ids), gradients(plain, ids), strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    one_tensor = ids.numel() * fused.config.intermediate_size * 4  # float32 here
    assert saved_bytes(fused, ids) <= saved_bytes(plain, ids) - layers * one_tensor
    copied = copy.deepcopy(fused)  # the forward is the module's own: it follows a copy
    mlps = [m for m in copied.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps and all(mlp.forward.args[0] is mlp for mlp in mlps)
    assert torch.equal(copied(input_ids=ids).logits, fused(input_ids=ids).logits)
