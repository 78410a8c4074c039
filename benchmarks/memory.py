"""`make bench-memory`: the recipe's measured peak memory against the pre-flight estimate (`shared.jobs.memory`).

Runs `python -m worker.training` on SmolLM2-135M-Instruct (NF4, LoRA r=16 on q/k/v/o, batch 2, one epoch of 4
chats whose answers fill `max_seq_length`) at each length, with and without gradient checkpointing, one after
the other, and prints the peak RSS each run reports (the allocator the worker preloads, as a job has it), the
estimate for the same job on this CPU, their ratio, and the run's wall time.

    python -m benchmarks.memory [--lengths 512 1024 2048]"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import ROOT, base_model, recipe_env

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WORDS = ("the quick brown fox jumps over the lazy dog while parrots squawk loudly " * 400).split()


def run(model: Path, out: Path, length: int, checkpointing: bool) -> tuple[dict, float]:
    data = out / f"data-{length}.jsonl"
    answers = [" ".join(WORDS[i : i + length]) for i in range(4)]
    rows = [{"messages": [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": answer}]}
            for answer in answers]  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {"base_model_path": str(model), "train_file": str(data), "validation_file": str(data), "n_epochs": 1,
              "batch_size": 2, "max_seq_length": length, "n_checkpoints": 0, "n_evals": 0, "evaluation_prompts": 0,
              "lora_target_modules": TARGETS, "gradient_checkpointing": checkpointing}  # fmt: skip
    path = out / "config.json"
    path.write_text(json.dumps(config))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "worker.training", "--config", str(path), "--out", str(out / "run")],
                            capture_output=True, text=True, env=recipe_env(), cwd=ROOT)  # fmt: skip
    done = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
            if line.startswith("@tunequeue ") and '"event": "done"' in line]  # fmt: skip
    if not done:
        raise SystemExit(f"the recipe failed at {length} tokens:\n{result.stderr[-3000:]}")
    return done[0]["metrics"], time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    args = parser.parse_args(argv)
    from shared.jobs import memory
    from worker.training.model import compute_dtype

    model = base_model()
    shape = memory.ModelShape.of(json.loads((model / "config.json").read_text()))
    dtype_bytes = compute_dtype().itemsize
    print(f"{platform.processor() or platform.machine()}, computing in {compute_dtype()}", flush=True)
    print("| max_seq_length | gradient checkpointing | measured peak RSS MiB | estimate MiB | estimate / measured "
          "| wall s |\n|---|---|---|---|---|---|", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for length in args.lengths:
            for checkpointing in (False, True):
                metrics, seconds = run(model, Path(scratch), length, checkpointing)
                estimate = memory.estimate_peak(
                    shape, quantization="nf4", lora_r=16, lora_targets=TARGETS,
                    forward_tokens=memory.forward_tokens(length, memory.MICRO_BATCH_TOKENS),
                    gradient_checkpointing=checkpointing, dtype_bytes=dtype_bytes, device="cpu",
                )  # fmt: skip
                measured = metrics["peak_rss_mib"]
                mib = estimate.total / 2**20
                print(f"| {length} | {'on' if checkpointing else 'off'} | {measured:.0f} | {mib:.0f} | "
                      f"{mib / measured:.2f} | {seconds:.0f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
