"""LoRA dropout with cheaper random masks on the CPU. PEFT drops the input of every adapted module with its own
`torch.nn.Dropout`, which draws one random number per element; on a CPU that draw was a seventh of a training
step (docs/BENCHMARKS.md). Here a mask is a function of one 64-bit seed, drawn from PyTorch's generator per
module and per call: element i's decision is a 16-bit lane of SplitMix64's output for counter i // 4 (four
lanes per 64-bit value), computed with vectorised integer operations on both cores where the generator's draw
runs on one. The same distribution, one independent mask per module and per step, reproducible from the same
seed and resumed with the same RNG state; the backward draws the mask again from the seed alone. The drop
probability is rounded to a multiple of 1/65,536 (0.05 becomes 0.0500031). On a GPU, where `torch.nn.Dropout`
is one fused kernel, PEFT's modules stay."""

import torch

LANES = 4  # 16-bit lanes per 64-bit value
LANE_VALUES = 1 << 16

# SplitMix64 (Steele, Lea and Flood, 2014): the golden-ratio increment and the two multipliers of its output
# function, as signed 64-bit integers (PyTorch's int64 products wrap modulo 2**64, as the algorithm needs).
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_counters: dict[torch.device, torch.Tensor] = {}


def _counter_steps(n: int, device: torch.device) -> torch.Tensor:
    """i × the increment for i < n (wrapping), kept per device and grown as needed."""
    kept = _counters.get(device)
    if kept is None or kept.numel() < n:
        kept = torch.arange(max(n, 1 << 16), dtype=torch.int64, device=device).mul_(_GAMMA)
        _counters[device] = kept
    return kept[:n]


def _shift_xor(z: torch.Tensor, bits: int, scratch: torch.Tensor) -> None:
    """z ^= z >>> bits (a logical shift: PyTorch shifts signed integers arithmetically)."""
    torch.bitwise_right_shift(z, bits, out=scratch)
    scratch.bitwise_and_((1 << (64 - bits)) - 1)
    z.bitwise_xor_(scratch)


def splitmix64(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first n outputs of SplitMix64 seeded with `seed`, as int64 (the bits of the unsigned values)."""
    start = (seed + _GAMMA) % (1 << 64)  # the state after its first step, as a signed 64-bit integer
    z = _counter_steps(n, torch.device(device)) + (start - (1 << 64) if start >= 1 << 63 else start)
    scratch = torch.empty_like(z)
    _shift_xor(z, 30, scratch)
    z.mul_(_MIX1)
    _shift_xor(z, 27, scratch)
    z.mul_(_MIX2)
    _shift_xor(z, 31, scratch)
    return z


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One 64-bit seed from PyTorch's generator (the global one by default)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


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
        return _Drop.apply(x, self.keep_mask(x, draw_seed()), self.scale)

    def keep_mask(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The mask of elements kept, in x's shape: a function of `seed` and x's size only."""
        values = splitmix64(seed, (x.numel() + LANES - 1) // LANES, x.device)
        return (values.view(torch.int16)[: x.numel()] >= self.threshold).view(x.shape)

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


class DroppedLoraA(torch.nn.Linear):
    """LoRA's A projection with the adapter's dropout inside it, keeping for the backward only what it cannot
    recompute: the layer's input as it came (the same tensor for q, k and v), and the seed its mask came from.

    PEFT casts each adapted module's input to the adapter's float32, drops it, and its A projection keeps that
    dropped float32 copy for the weight's gradient: three copies of the attention input and one of the output
    projection's, each twice the size of the bf16 input (docs/BENCHMARKS.md). Here the mask is computed again in
    the backward from the saved seed (the backward draws nothing from the global generator), and the cast, mask
    and scale applied again; the values and gradients are the same as PEFT's to the bit. It holds the
    `weight` PEFT made (same parameter, same state-dict key)."""

    def __init__(self, weight: torch.nn.Parameter, dropout: torch.nn.Module):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = weight
        self.lane = dropout if isinstance(dropout, LaneDropout) and dropout.threshold > -(LANE_VALUES >> 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.lane is not None):
            return _DroppedLinear.apply(x, None, 1.0, self.weight)
        return _DroppedLinear.apply(x, self.lane, self.lane.scale, self.weight)


class _DroppedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lane: LaneDropout | None, scale: float, weight):  # type: ignore[override]
        seed, keep = None, None
        if lane is not None:
            seed = draw_seed()
            keep = lane.keep_mask(x, seed)
        ctx.save_for_backward(x, weight)
        ctx.lane, ctx.seed, ctx.scale = lane, seed, scale
        return torch.nn.functional.linear(_dropped(x, keep, scale, weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        keep = None
        if ctx.lane is not None:  # the forward's mask, computed again from its seed
            keep = ctx.lane.keep_mask(x, ctx.seed)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            if keep is not None:
                grad_x = torch.where(keep, grad_x, 0).mul_(ctx.scale)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[3]:
            dropped = _dropped(x, keep, ctx.scale, weight.dtype)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])
        return grad_x, None, None, grad_weight


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, dropped and scaled as PEFT's cast then dropout compute it."""
    if keep is None:
        return x.to(dtype)
    return torch.where(keep, x, 0).to(dtype).mul_(scale)


def fuse_lora_inputs(model) -> int:
    """On a CPU model, gives every LoRA layer a DroppedLoraA (its dropout, LaneDropout or none, moved inside)
    and lets the layer's input reach it uncast; returns how many adapters it changed."""
    if next(model.parameters()).device.type != "cpu":
        return 0
    fused = 0
    for module in model.modules():
        dropouts, projections = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not isinstance(projections, torch.nn.ModuleDict):
            continue
        here = 0
        for name, projection in projections.items():
            dropout = dropouts[name]
            usable = isinstance(dropout, LaneDropout | torch.nn.Identity)
            if type(projection) is not torch.nn.Linear or projection.bias is not None or not usable:
                continue
            projections[name] = DroppedLoraA(projection.weight, dropout)
            dropouts[name] = torch.nn.Identity()
            here += 1
        fused += here
        if here:
            module.cast_input_dtype_enabled = False  # PEFT's own switch: the input reaches DroppedLoraA as it came
    return fused
