"""Llama-style RMSNorm computed in float32 in one autograd step, on a CPU under a bf16 compute dtype. The norm
layers compute in float32 and round once (`model.norms_in_float32`); done with autograd, the backward keeps a
float32 copy of each norm's bf16 input, two per decoder layer. `Float32RMSNorm` keeps the input as it came and
the per-row scale, and computes the backward in float32 from them: the same values and gradients, half the
memory for the norms' inputs (docs/BENCHMARKS.md). Applied by swapping the module's class for a subclass, not its
`forward`: transformers puts the class's own forward back on the layers the `kernels` package may replace, RMSNorm
among them, whenever the model changes mode."""

import torch

# Norm classes whose forward is `weight * (x * rsqrt(mean(x^2) + variance_epsilon))`, computed in float32.
LLAMA_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class Float32RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (weight * (x32 * rstd)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        normalised = x.float() * rstd
        grad32 = grad.float()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normalised = grad32 * weight
            inner = (grad_normalised * normalised).mean(-1, keepdim=True)
            grad_x = (rstd * (grad_normalised - normalised * inner)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad32 * normalised).reshape(-1, normalised.shape[-1]).sum(0)
        return grad_x, grad_weight, None


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return Float32RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


_FUSED: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass with the same name (`model.is_norm` and the lists above go by names) and the fused forward."""
    if cls not in _FUSED:
        _FUSED[cls] = type(cls.__name__, (cls,), {"forward": _forward, "__module__": __name__})
    return _FUSED[cls]


def can_fuse(module) -> bool:
    """A Llama-style RMSNorm with float32 weights on a CPU."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ in LLAMA_RMS_NORMS
        and type(module).forward is not _forward  # not fused already
        and hasattr(module, "variance_epsilon")
        and isinstance(weight, torch.nn.Parameter)
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
    )


def fuse_norm(module) -> None:
    module.__class__ = _fused_class(type(module))
