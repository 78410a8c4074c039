"""GGUF → safetensors + tokenizer. transformers dequantises the GGUF; a model loaded from GGUF refuses
`save_pretrained`, so the weights move into a fresh model built from the same config, saved in bf16.

Runs in its own process (`python -m worker.training.gguf_import GGUF TARGET`), so that the CLI that asks for
it never imports torch; each stage is reported on stderr as it starts."""

import argparse
import contextlib
import functools
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from shared.basemodels.demo import DEMO_MODEL_ID, demo_gguf_path

__all__ = ["DEMO_MODEL_ID", "demo_gguf_path", "import_gguf"]


def import_gguf(gguf: Path, target: Path, progress=lambda message: None) -> None:
    """Write `target/`: config.json, model.safetensors (bf16) and the tokenizer with its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf.resolve()
    with parsed_once():
        progress("reading the tokenizer and chat template")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress("dequantising the weights")
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    progress(f"writing bf16 safetensors to {target}")
    if target.exists():
        shutil.rmtree(target)
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """While open, the `gguf` package parses each file once and builds each tensor-name map once. transformers
    reads the file three times (config, tokenizer, weights), each parse walking the ~100,000 vocabulary and merge
    strings one at a time, and builds the name map again for each of the model's ~400 modules: the import
    takes half the time with each done once (docs/BENCHMARKS.md). Both are read-only once built."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(reader)  # type: ignore[misc,assignment]  # keyed by path (and mode)
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training.gguf_import", description=__doc__)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"  [{time.monotonic() - started:5.1f} s] {message}", file=sys.stderr, flush=True)

    import_gguf(args.gguf, args.target, progress)
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
