"""Attention over packed rows one example at a time, on a CPU.

A packed row holds several examples; transformers masks attention across them with a block-diagonal causal mask,
and SDPA computes every query against every key of the row before the mask discards most of them. So rows were
kept as wide as the batch's longest example, with the padding that costs. Here each example of a row goes
through SDPA on its own, causal, without a mask: the same attention, computed only where it counts, and a
micro-batch packs into one row (`data.Collator(one_row=True)`) with no padding but the row's rounding
(docs/BENCHMARKS.md: +13% tokens/s, 6% less peak memory on mixed-length chats).

The examples are read off the mask itself, never guessed from position ids: a mask that is not exactly
block-diagonal causal (padding on the left, a cache, any other pattern) goes to transformers' SDPA unchanged."""

import torch

NAME = "tunequeue_packed"

# The last mask seen and its sequences: one mask serves every layer of a forward. The mask is held, so no other
# tensor can take its identity while it is kept here.
_last: tuple[torch.Tensor, int, list[list[int]] | None] | None = None


def sequence_lengths(mask: torch.Tensor) -> list[list[int]] | None:
    """Each row's sequence lengths when `mask` (batch, 1, n, n, boolean) is block-diagonal causal, else None."""
    global _last
    if _last is not None and _last[0] is mask and _last[1] == mask._version:
        return _last[2]
    lengths = _block_lengths(mask)
    _last = (mask, mask._version, lengths)
    return lengths


def _block_lengths(mask: torch.Tensor) -> list[list[int]] | None:
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    n = mask.shape[-1]
    square = mask[:, 0]
    # A sequence starts where a query may not see the key just before it.
    starts = torch.ones(square.shape[0], n, dtype=torch.bool, device=mask.device)
    starts[:, 1:] = ~square[:, torch.arange(1, n), torch.arange(n - 1)]
    segment = starts.cumsum(-1)
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(square, (segment[:, :, None] == segment[:, None, :]) & causal):
        return None
    lengths = []
    for row in starts.tolist():
        at = [i for i, start in enumerate(row) if start] + [n]
        lengths.append([end - begin for begin, end in zip(at, at[1:], strict=False)])
    return lengths


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: (output as batch, sequence, heads, head size; no weights)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = None
    if attention_mask is not None and dropout == 0.0 and kwargs.get("position_bias") is None:
        if query.shape[2] == key.shape[2] and getattr(module, "is_causal", True):
            lengths = sequence_lengths(attention_mask)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for row, row_lengths in enumerate(lengths):
        parts = zip(*(t[row : row + 1].split(row_lengths, dim=2) for t in (query, key, value)), strict=True)
        outputs = [_causal_attention(q, k, v, scaling, gqa) for q, k, v in parts]
        rows.append(torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0])
    output = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return output.transpose(1, 2).contiguous(), None


# Sequences go through SDPA padded at their end to a multiple of this many tokens. PyTorch's CPU flash attention
# keeps something for every sequence length it has seen (about 4 MB each in bf16): lengths that follow the data
# made a job's memory grow by ~50 MB a step (docs/BENCHMARKS.md). Padding after the last token changes nothing
# before it (causal attention looks back only) and is cut off the output.
LENGTH_MULTIPLE = 32


def _causal_attention(q, k, v, scaling, gqa: bool):
    length = q.shape[2]
    pad = -length % LENGTH_MULTIPLE
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    output = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    return output[:, :, :length] if pad else output


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as SDPA's, read by the function above


def per_sequence_attention(model) -> bool:
    """Whether `model` (PEFT's or transformers') attends to each packed example on its own."""
    return getattr(model.config, "_attn_implementation", None) == NAME


def use_packed_attention(model) -> bool:
    """On a CPU model that attends with SDPA, attention one packed sequence at a time; whether it was set."""
    if next(model.parameters()).device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
