"""A job paused and resumed on a GPU trains exactly as one that ran straight through: the resume restores every
CUDA device's random generator (LoRA dropout draws its masks there), not only the CPU's. Run by `make gpu-check`
on a tiny random Llama with real NF4; skipped, with the reason, where no CUDA device exists."""

import pytest

from tests.gpu.support import needs_cuda
from tests.unit.test_recipe import paused_run_matches_uninterrupted

pytestmark = [pytest.mark.gpu, needs_cuda]


def test_a_paused_and_resumed_run_matches_an_uninterrupted_one_on_cuda(tmp_path, tiny_model):
    # A high dropout rate, so that masks drawn from a generator seeded afresh at the resume move the loss curve
    # well past the tolerance; the tolerance leaves room for the GPU kernels' own summation orders.
    paused_run_matches_uninterrupted(tmp_path, tiny_model, lora_dropout=0.3, tolerance=2e-3)
