"""The gated MLP's activation in one autograd step, on a CPU. Llama-style MLPs compute
`down(silu(gate(x)) * up(x))`; autograd keeps three intermediate-size tensors of every layer for the backward
(the gate's output for the SiLU, the SiLU's output and the up projection's for the product). `SiluTimesUp` keeps
the two it cannot recompute and derives the SiLU again in the backward: a third less of the largest tensors
of a decoder layer (docs/BENCHMARKS.md). Its backward computes in float32 and rounds once, where autograd
rounds the SiLU and the product's gradient to the compute dtype on the way."""

import functools
from typing import Any

import torch

# MLP classes whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
SILU = ("SiLU", "SiLUActivation")


class SiluTimesUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        gate32, grad32 = gate.float(), grad.float()
        sigmoid = torch.sigmoid(gate32)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = (grad32 * up.float() * sigmoid * (1 + gate32 * (1 - sigmoid))).to(gate.dtype)
        if ctx.needs_input_grad[1]:
            grad_up = (grad32 * gate32 * sigmoid).to(up.dtype)
        return grad_gate, grad_up


def _forward(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(SiluTimesUp.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def fuse_gated_mlps(model) -> int:
    """Gives every Llama-style SiLU MLP of a CPU model the fused activation; returns how many."""
    if next(model.parameters()).device.type != "cpu":
        return 0
    fused = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
            # The instance's own forward; its hooks stay. (transformers resets the forward of the layers the
            # `kernels` package may swap, RMSNorm among them, on a change of mode: `fused_norm` swaps their class.)
            module.forward = functools.partial(_forward, module)
            fused += 1
    return fused
