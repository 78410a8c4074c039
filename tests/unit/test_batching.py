"""Length-aware batching: every example once per epoch, the same order for the same (seed, epoch), and far less
room between the lengths that share a batch than a plain shuffle leaves."""

import random

import pytest

from shared.datasets.tokenization import Encoded
from worker.training import data as chat_data
from worker.training.batching import batches


def examples(n: int, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    return [Encoded(input_ids=[i] * rng.randint(20, 450), labels=[i] * 3) for i in range(n)]


def ids(epoch_batches: list[list[Encoded]]) -> list[list[int]]:
    return [[e.input_ids[0] for e in batch] for batch in epoch_batches]


def padding(epoch_batches: list[list[Encoded]]) -> int:
    """Tokens a padded batch would add: each example up to its batch's longest."""
    return sum(max(len(e.input_ids) for e in b) * len(b) - sum(len(e.input_ids) for e in b) for b in epoch_batches)


@pytest.mark.parametrize("n,batch_size", [(64, 8), (301, 8), (13, 4), (3, 8)])
def test_every_example_once_and_only_the_last_batch_short(n, batch_size):
    epoch = batches(examples(n), batch_size, seed=5, epoch=2)
    seen = [i for batch in ids(epoch) for i in batch]
    assert sorted(seen) == list(range(n))
    assert [len(b) for b in epoch[:-1]] == [batch_size] * (len(epoch) - 1)
    assert len(epoch[-1]) == (n % batch_size or batch_size)


def test_the_order_is_a_function_of_seed_and_epoch():
    data = examples(300)
    assert ids(batches(data, 8, seed=1, epoch=1)) == ids(batches(data, 8, seed=1, epoch=1))
    assert ids(batches(data, 8, seed=1, epoch=1)) != ids(batches(data, 8, seed=1, epoch=2))
    assert ids(batches(data, 8, seed=1, epoch=1)) != ids(batches(data, 8, seed=2, epoch=1))


def test_grouping_cuts_the_padding_and_still_shuffles_the_steps():
    data = examples(512)
    grouped, plain = batches(data, 8, seed=0, epoch=1), batches(data, 8, seed=0, epoch=1, group_by_length=False)
    assert padding(grouped) < padding(plain) / 5
    longest = [max(len(e.input_ids) for e in b) for b in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # not one long ramp


def test_without_grouping_the_order_is_the_plain_shuffle():
    data = examples(50)
    assert ids(batches(data, 8, 3, 1, group_by_length=False)) == ids(chat_data.batches(data, 8, 3, 1))
