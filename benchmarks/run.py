"""`make bench`: the recipe's speed and memory, NF4 + LoRA against its peer run side by side (the same
recipe on the unquantised bf16 base), on SmolLM2-135M-Instruct and the sample data.

Each variant runs `python -m worker.training` in its own process for the same steps; tokens/s is the median
over steps after the first (warm-up), memory is the child's peak RSS (CPU) or peak CUDA memory (GPU)."""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker.training.reporter import parse_line

ROOT = Path(__file__).resolve().parent.parent


def base_model() -> Path:
    from shared.settings import get_settings
    from worker.training.gguf_import import demo_gguf_path, import_gguf

    path = get_settings().resolved_model_dir / "smollm2-135m-instruct"
    if not (path / "model.safetensors").is_file():
        import_gguf(demo_gguf_path(), path)
    return path


def run_variant(model: Path, quantization: str, examples: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "train.jsonl"
        lines = (ROOT / "data/sample/train.jsonl").read_text().splitlines()[:examples]
        data.write_text("\n".join(lines) + "\n")
        config = Path(scratch) / "cfg.json"
        config.write_text(
            json.dumps(
                {
                    "base_model_path": str(model),
                    "train_file": str(data),
                    "n_epochs": 1,
                    "batch_size": batch_size,
                    "quantization": quantization,
                    "seed": 0,
                }
            )
        )
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "worker.training", "--config", str(config), "--out", str(Path(scratch) / "out")],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    events = [e for e in map(parse_line, result.stdout.splitlines()) if e]
    steps = [e for e in events if e["event"] == "metrics"]
    done = next(e for e in events if e["event"] == "done")["metrics"]
    return {
        "quantization": quantization,
        "steps": len(steps),
        "tokens_per_second": statistics.median(s["tokens_per_second"] for s in steps[1:]),
        "final_loss": steps[-1]["train_loss"],
        "wall_seconds": wall,
        "peak_rss_mib": done["peak_rss_mib"],
        "peak_gpu_memory_mib": done.get("peak_gpu_memory_mib"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model = base_model()
    results = [run_variant(model, q, args.examples, args.batch_size) for q in ("nf4", "none")]
    nf4, peer = results
    print("| variant | steps | tokens/s (median) | wall s | peak RSS MiB | final loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['quantization']} + LoRA | {r['steps']} | {r['tokens_per_second']:.0f} | {r['wall_seconds']:.1f} "
            f"| {r['peak_rss_mib']:.0f} | {r['final_loss']:.3f} |"
        )
    print(
        f"\nNF4/bf16 ratios: speed {nf4['tokens_per_second'] / peer['tokens_per_second']:.2f}x, "
        f"peak memory {nf4['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
