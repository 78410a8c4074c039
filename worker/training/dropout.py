"""LoRA dropout with fewer random draws on the CPU. PEFT drops the input of every adapted module with its own
`torch.nn.Dropout`, which draws one random number per element; on a CPU that draw is a seventh of a training
step (docs/BENCHMARKS.md). Here each 64-bit draw of PyTorch's generator gives three elements their decision,
from its three low 16-bit lanes (its top lane holds only 15 random bits and is not used): the same
distribution, one independent mask per module and per step, reproducible from the same seed and resumed with
the same RNG state, with the drop probability rounded to a multiple of 1/65,536 (0.05 becomes 0.0500031).
On a GPU, where `torch.nn.Dropout` is one fused kernel, PEFT's modules stay."""

import torch

LANES = 3  # 16-bit lanes used per 64-bit draw
LANE_VALUES = 1 << 16


class LaneDropout(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * LANE_VALUES) - (LANE_VALUES >> 1)  # lanes are int16: below it, dropped
        self.scale = 1.0 / (1.0 - self.dropped_fraction)

    @property
    def dropped_fraction(self) -> float:
        return (self.threshold + (LANE_VALUES >> 1)) / LANE_VALUES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold <= -(LANE_VALUES >> 1):
            return x
        return _Drop.apply(x, self.keep_mask(x), self.scale)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        draws = torch.empty((x.numel() + LANES - 1) // LANES, dtype=torch.int64, device=x.device).random_()
        lanes = draws.view(torch.int16).view(-1, 4)[:, :LANES].reshape(-1)[: x.numel()]
        return (lanes >= self.threshold).view(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p} (drops {self.dropped_fraction:.7f})"


class _Drop(torch.autograd.Function):
    """x where kept, scaled; the backward keeps only the boolean mask (one byte an element)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def use_lane_dropout(model) -> int:
    """Puts a LaneDropout in place of every LoRA module's torch.nn.Dropout, on a CPU model; returns how many."""
    if next(model.parameters()).device.type != "cpu":
        return 0
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                dropouts[name] = LaneDropout(dropout.p)
                replaced += 1
    return replaced
