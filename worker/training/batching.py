"""The order in which an epoch meets its examples: shuffled by seed and epoch, and grouped by length.

A packed batch is as wide as its longest example, so a batch that mixes a 60-token example with a 450-token
one pads or packs around the difference. Grouping examples of similar length into the same batch removes most
of that: the epoch is shuffled, cut into buckets of several batches, each bucket sorted by length and cut into
batches, and the batches shuffled again, so that lengths vary from one step to the next as before and every
example is still seen once per epoch. The order is a function of (seed, epoch) alone: a resumed run recomputes
it and continues at the saved batch index."""

import random

from shared.datasets.tokenization import Encoded

BATCHES_PER_BUCKET = 16  # how far apart examples may be in the shuffle and still share a batch


def batches(
    examples: list[Encoded], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[Encoded]]:
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if not group_by_length:
        return [[examples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
    batch_order = length_grouped(order, [len(e.input_ids) for e in examples], batch_size)
    full, partial = batch_order[: len(order) // batch_size], batch_order[len(order) // batch_size :]
    rng.shuffle(full)  # the short last batch stays last, where an epoch without grouping has it
    return [[examples[i] for i in batch] for batch in full + partial]


def length_grouped(order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches cut from each bucket of `order` once sorted by length (stable: ties keep the shuffled order). Only
    the last batch of all can be short: buckets hold whole batches, and the last bucket's sort puts its remainder
    (the longest examples of that bucket) at its end."""
    bucket = batch_size * BATCHES_PER_BUCKET
    grouped: list[int] = []
    for start in range(0, len(order), bucket):
        grouped += sorted(order[start : start + bucket], key=lambda i: lengths[i])
    return [grouped[start : start + batch_size] for start in range(0, len(grouped), batch_size)]
