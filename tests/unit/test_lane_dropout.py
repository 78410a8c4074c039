"""LoRA dropout from 16-bit lanes of SplitMix64 values, seeded once per call: the drop rate asked for (to
1/65,536), kept values scaled, one independent mask per module, the gradient through the same mask,
reproducible from the seed, so that gradient checkpointing's recomputation draws the same masks; identity in eval
mode. With the dropout moved inside LoRA's A projection, the same values and gradients as PEFT's for less kept
for the backward."""

import math

import pytest
import torch

from tests.support import tiny_lora
from worker.training.dropout import DroppedLoraA, LaneDropout, fuse_lora_inputs, splitmix64, use_lane_dropout

N = 512 * 576  # one micro-batch's input to a projection of SmolLM2-135M


def test_drops_the_rate_asked_and_scales_what_it_keeps():
    dropout = LaneDropout(0.05)
    assert dropout.dropped_fraction == pytest.approx(0.05, abs=1 / 65536)
    torch.manual_seed(0)
    x = torch.rand(N) + 1.0  # never zero
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    sigma = math.sqrt(0.05 * 0.95 / N)
    assert abs(dropped - dropout.dropped_fraction) < 5 * sigma
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - dropout.dropped_fraction))


def test_two_modules_draw_independent_masks_and_the_seed_repeats_them():
    a, b = LaneDropout(0.1), LaneDropout(0.1)
    x = torch.ones(N)
    torch.manual_seed(1)
    first, second = a(x) == 0, b(x) == 0
    both = (first & second).float().mean().item()
    assert abs(both - 0.01) < 5 * math.sqrt(0.01 * 0.99 / N)  # independent: p squared
    torch.manual_seed(1)
    assert torch.equal(a(x) == 0, first)


def test_the_gradient_goes_through_the_same_mask():
    dropout = LaneDropout(0.2)
    x = torch.randn(4096, dtype=torch.bfloat16, requires_grad=True)
    y = dropout(x)
    y.backward(torch.ones_like(y))
    expected = (y != 0).to(torch.bfloat16) / (1 - dropout.dropped_fraction)
    assert torch.equal(x.grad, expected)


def test_eval_mode_and_zero_rate_change_nothing():
    x = torch.randn(1000)
    assert torch.equal(LaneDropout(0.5).eval()(x), x)
    assert torch.equal(LaneDropout(0.0)(x), x)


def lora(tiny_model, dropout: float, dtype=None):
    return tiny_lora(tiny_model, dtype, targets=("q_proj", "k_proj", "v_proj", "o_proj"), dropout=dropout)


def gradients(model, ids: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_every_lora_dropout_is_replaced_and_checkpointing_recomputes_the_same_masks(tiny_model):
    model = lora(tiny_model, 0.1)
    layers = model.base_model.model.config.num_hidden_layers
    assert use_lane_dropout(model) == 4 * layers
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules() if not isinstance(m, torch.nn.Identity))
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    plain = gradients(model, ids)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    inside_a_layer = model.base_model.model.model.layers[0].self_attn  # the layer's own hooks stay outside
    inside_a_layer.register_forward_hook(lambda *_: calls.append(1))
    recomputed = gradients(model, ids)
    assert len(calls) == 2  # the layer ran again in the backward: checkpointing is on
    for got, want in zip(recomputed, plain, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    without = lora(tiny_model, 0.0)  # no dropout at all: other gradients, so the masks did act
    assert use_lane_dropout(without) == 0
    assert not all(torch.allclose(a, b) for a, b in zip(gradients(without, ids), plain, strict=True))


def saved_bytes(model, ids: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes the autograd graph keeps for the backward of one forward (each storage once; of `dtype` only)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        if dtype is None or tensor.dtype == dtype:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize(("dtype", "dropout"), [(torch.bfloat16, 0.1), (torch.float32, 0.1), (torch.bfloat16, 0.0)])
def test_dropout_inside_lora_a_gives_peft_s_gradients_and_keeps_less(tiny_model, dtype, dropout):
    peft_way, fused = lora(tiny_model, dropout, dtype), lora(tiny_model, dropout, dtype)
    use_lane_dropout(peft_way), use_lane_dropout(fused)
    layers = fused.base_model.model.config.num_hidden_layers
    keys = list(fused.state_dict())
    assert fuse_lora_inputs(fused) == 4 * layers
    assert list(fused.state_dict()) == keys  # the same adapter files
    assert sum(isinstance(m, DroppedLoraA) for m in fused.modules()) == 4 * layers
    ids = torch.randint(0, fused.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    for got, want in zip(gradients(fused, ids), gradients(peft_way, ids), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    fused.eval(), peft_way.eval()
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, peft_way(input_ids=ids).logits)
    dropped_copy = ids.numel() * fused.config.hidden_size * 4  # one float32 input of an adapted module
    assert saved_bytes(fused, ids) <= saved_bytes(peft_way, ids) - 2 * layers * dropped_copy
    assert saved_bytes(fused, ids, torch.bool) == 0  # no masks kept: drawn again in the backward
    fused.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for got, want in zip(gradients(fused, ids), gradients(peft_way, ids), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def splitmix64_reference(seed: int, n: int) -> list[int]:
    """SplitMix64 in Python's unbounded integers, reduced modulo 2**64 at each step as its definition says."""
    mask, state, out = (1 << 64) - 1, seed % (1 << 64), []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF])
def test_masks_come_from_splitmix64_with_wrapping_integer_arithmetic(seed):
    got = [value % (1 << 64) for value in splitmix64(seed, 1000).tolist()]
    assert got == splitmix64_reference(seed, 1000)
    grown = splitmix64(seed, 70_000)  # beyond the counters kept so far: grown, the same prefix
    assert [value % (1 << 64) for value in grown[:1000].tolist()] == got


def test_a_mask_depends_on_its_seed_and_size_only():
    dropout = LaneDropout(0.3)
    x = torch.empty(3, 1001)
    mask = dropout.keep_mask(x, 42)
    assert torch.equal(mask, dropout.keep_mask(torch.empty(3003), 42).view(3, 1001))
    assert not torch.equal(mask, dropout.keep_mask(x, 43))
    assert abs((~mask).float().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 3003)
