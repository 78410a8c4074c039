"""`make bench`: the recipe's speed and memory against a peer run side by side, on SmolLM2-135M-Instruct.

0. Against TRL: the recipe against TRL's SFTTrainer with its defaults (benchmarks/trl_peer.py) on the same NF4
   base, LoRA, data and hyperparameters, one after the other, each in its own process; real tokens/s of the
   training loop, peak memory, and held-out assistant loss measured by one evaluator (benchmarks/evaluator.py).
1. Quantisation: NF4 + LoRA against the same recipe on the unquantised bf16 base (sample data).
2. Packing: on against off, NF4, on conversations of mixed length (1 to 8 exchanges).
3. Chat tokenization (validation, dry runs, the recipe's data): one render per conversation against rendering
   every prefix again for each assistant turn, on one conversation of 100 to 1,600 messages.

Each variant runs `python -m worker.training` in its own process for the same steps; tokens/s counts real
(non-padding) tokens, median over the steps after the first; memory is the recipe process's peak RSS (CPU)
or peak CUDA memory (GPU)."""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.settings import get_settings
from worker.runner import allocator
from worker.training.reporter import parse_line

ROOT = Path(__file__).resolve().parent.parent
COMPARISON_MAX_LENGTH = 512


def recipe_env() -> dict[str, str]:
    """The environment a worker gives the recipe's processes: the allocator it preloads."""
    return {**os.environ, **allocator.environment(get_settings().training_allocator, dict(os.environ))}


def base_model() -> Path:
    from shared.settings import get_settings
    from worker.training.gguf_import import demo_gguf_path, import_gguf

    path = get_settings().resolved_model_dir / "smollm2-135m-instruct"
    if not (path / "model.safetensors").is_file():
        import_gguf(demo_gguf_path(), path)
    return path


def sample_lines(examples: int) -> list[str]:
    return (ROOT / "tunequeue/sample/train.jsonl").read_text().splitlines()[:examples]


def mixed_length_lines(examples: int, seed: int = 0) -> list[str]:
    """Conversations of 1 to 8 sample exchanges each: from ~60 to ~450 tokens."""
    exchanges = [json.loads(line)["messages"] for line in sample_lines(200)]
    rng = random.Random(seed)
    return [
        json.dumps({"messages": [m for pair in rng.sample(exchanges, rng.randint(1, 8)) for m in pair]})
        for _ in range(examples)
    ]


def run_variant(model: Path, lines: list[str], batch_size: int, **options) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "train.jsonl"
        data.write_text("\n".join(lines) + "\n")
        config = Path(scratch) / "cfg.json"
        settings = {"n_epochs": 1, "batch_size": batch_size, "seed": 0, "n_evals": 0, "n_checkpoints": 0}
        config.write_text(json.dumps({"base_model_path": str(model), "train_file": str(data), **settings, **options}))
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "worker.training", "--config", str(config), "--out", str(Path(scratch) / "out")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=recipe_env(),
        )
        wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    events = [e for e in map(parse_line, result.stdout.splitlines()) if e]
    steps = [e for e in events if e["event"] == "metrics"]
    done = next(e for e in events if e["event"] == "done")["metrics"]
    return {
        **options,
        "steps": len(steps),
        "tokens_per_second": statistics.median(s["tokens_per_second"] for s in steps[1:]),
        "final_loss": steps[-1]["train_loss"],
        "wall_seconds": wall,
        "peak_rss_mib": done["peak_rss_mib"],
        "peak_gpu_memory_mib": done.get("peak_gpu_memory_mib"),
    }


def loop_figures(steps: list[dict]) -> tuple[int, float]:
    """(real tokens trained, seconds inside the training steps) from the recipe's per-step metrics."""
    tokens, seconds, before = 0, 0.0, 0
    for step in steps:
        step_tokens, before = step["trained_tokens"] - before, step["trained_tokens"]
        tokens, seconds = tokens + step_tokens, seconds + step_tokens / step["tokens_per_second"]
    return tokens, seconds


def recipe_against_trl(model: Path, data: Path, heldout: Path, batch_size: int, out: Path) -> dict:
    """The recipe as a job runs it, on the comparison's settings. `heldout` is its validation file only so that no
    training example is split off; with one evaluation, at the end, it steers nothing (the last adapter ships)."""
    settings = {
        "base_model_path": str(model), "train_file": str(data), "validation_file": str(heldout), "n_epochs": 1,
        "batch_size": batch_size, "max_seq_length": COMPARISON_MAX_LENGTH, "seed": 0, "n_evals": 0,
        "n_checkpoints": 0, "adapter_selection": "last",
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / "recipe.json"
    config.write_text(json.dumps(settings))
    command = [sys.executable, "-m", "worker.training", "--config", str(config), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=recipe_env())
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    events = [e for e in map(parse_line, result.stdout.splitlines()) if e]
    steps = [e for e in events if e["event"] == "metrics"]
    done = next(e for e in events if e["event"] == "done")["metrics"]
    tokens, seconds = loop_figures(steps)
    return {**done, "real_tokens": tokens, "loop_seconds": seconds, "steps": len(steps), "adapter": out / "adapter"}


def trl_against_recipe(model: Path, data: Path, batch_size: int, out: Path, env: dict[str, str] | None = None) -> dict:
    """TRL as its user runs it (`env` None), or with the recipe's environment (its allocator), like for like."""
    command = [
        sys.executable, "-m", "benchmarks.trl_peer", "--base", str(model), "--data", str(data), "--out", str(out),
        "--batch-size", str(batch_size), "--max-length", str(COMPARISON_MAX_LENGTH), "--seed", "0",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "adapter": out / "adapter"}


def heldout_loss(model: Path, adapter: Path | None, heldout: Path) -> float:
    command = [sys.executable, "-m", "benchmarks.evaluator", "--base", str(model), "--data", str(heldout)]
    result = subprocess.run(command + (["--adapter", str(adapter)] if adapter else []), capture_output=True,
                            text=True, cwd=ROOT)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["loss"]


def matmul_peak_gflops(size: int = 4096, repeats: int = 5) -> float:
    """The best GFLOP/s of one large matrix product in the compute dtype, on all of torch's threads."""
    import torch

    from worker.training.model import compute_dtype, device

    a, b = (torch.randn(size, size, dtype=compute_dtype(), device=device()) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def parameter_count(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(model / "model.safetensors", "pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def check_disjoint(lines: list[str], heldout: Path) -> None:
    trained = {m["content"] for line in lines for m in json.loads(line)["messages"] if m["role"] == "user"}
    held = {json.loads(line)["messages"][0]["content"] for line in heldout.read_text().splitlines() if line.strip()}
    assert not trained & held, f"held-out prompts seen in training: {sorted(trained & held)[:3]}"


def against_trl(model: Path, examples: int, batch_size: int) -> None:
    lines = mixed_length_lines(examples)
    heldout = ROOT / "tunequeue/sample/heldout.jsonl"
    check_disjoint(lines, heldout)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "train.jsonl"
        data.write_text("\n".join(lines) + "\n")
        runs[TRL] = trl_against_recipe(model, data, batch_size, Path(scratch) / "trl" / "out")
        if recipe_env().get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
            same_allocator = trl_against_recipe(model, data, batch_size, Path(scratch) / "trl-a" / "out", recipe_env())
            runs[TRL_SAME_ALLOCATOR] = same_allocator
        runs[OURS] = recipe_against_trl(model, data, heldout, batch_size, Path(scratch) / "recipe" / "out")
        for name, run in runs.items():
            print(f"{name}: {json.dumps(run, default=str)}", file=sys.stderr)
        base_loss = heldout_loss(model, None, heldout)
        for run in runs.values():
            run["heldout_loss"] = heldout_loss(model, run["adapter"], heldout)
    peak, flop_per_token = matmul_peak_gflops(), 4 * parameter_count(model)
    print_against_trl(runs, base_loss, peak, flop_per_token)


TRL, TRL_SAME_ALLOCATOR, OURS = "TRL SFTTrainer defaults", "TRL, the recipe's allocator preloaded", "tunequeue recipe"


def print_against_trl(runs: dict[str, dict], base_loss: float, peak: float, flop_per_token: int) -> None:
    print(f"Against TRL's SFTTrainer (held-out assistant loss of the base: {base_loss:.3f})\n")
    print("| run | real tokens | loop s | real tokens/s | peak RSS MiB | held-out loss | of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    ours = runs[OURS]
    memory_key = "peak_gpu_memory_mib" if ours.get("peak_gpu_memory_mib") else "peak_rss_mib"
    for name, run in runs.items():
        run["speed"] = run["real_tokens"] / run["loop_seconds"]
        print(
            f"| {name} | {run['real_tokens']} | {run['loop_seconds']:.1f} | {run['speed']:.1f} "
            f"| {run[memory_key]:.0f} | {run['heldout_loss']:.3f} | {run['speed'] * flop_per_token / 1e9 / peak:.1%} |"
        )
    for name, peer in runs.items():
        if name != OURS:
            print(
                f"| ratio to {name} | | | **{ours['speed'] / peer['speed']:.2f}x** "
                f"| **{ours[memory_key] / peer[memory_key]:.2f}x** "
                f"| {ours['heldout_loss'] - peer['heldout_loss']:+.3f} | |"
            )
    allocator_used = recipe_env().get("LD_PRELOAD") or "glibc malloc"
    print(
        f"\nmatmul peak: {peak:.0f} GFLOP/s; work per token: 4 x {flop_per_token // 4:,} parameters = "
        f"{flop_per_token / 1e9:.2f} GFLOP (forward 2N, backward through the activations 2N); the recipe's "
        f"allocator: {allocator_used}\n"
    )


def tokenization_rows(model: Path, sizes: tuple[int, ...] = (100, 400, 1600)) -> list[dict]:
    """Seconds to encode one conversation of n messages, best of 3, with the one-render method and with the
    prefix-by-prefix method it replaced (still the fallback for templates that rewrite contents)."""
    from shared.datasets.tokenization import ChatTokenizer
    from shared.datasets.validation import CHAT

    class PrefixByPrefix(ChatTokenizer):
        def _spans_in_one_render(self, messages, text, trained):
            return None

    rows = []
    for n in sizes:
        record = {"messages": [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(n)]}
        row: dict = {"messages": n}
        for name, tokenizer in (("one_render", ChatTokenizer(model)), ("per_prefix", PrefixByPrefix(model))):
            timings = []
            for _ in range(3):
                started = time.perf_counter()
                encoded = tokenizer.encode(record, CHAT, 1 << 22)
                timings.append(time.perf_counter() - started)
            row[name], row[f"{name}_labels"] = min(timings), encoded.labels
        assert row["one_render_labels"] == row["per_prefix_labels"], f"loss masks differ at {n} messages"
        rows.append(row)
    return rows


def table(title: str, rows: list[dict], key: str) -> None:
    print(f"{title}\n")
    print(f"| {key} | steps | tokens/s (median) | wall s | peak RSS MiB | final loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[key]} | {r['steps']} | {r['tokens_per_second']:.0f} | {r['wall_seconds']:.1f} "
            f"| {r['peak_rss_mib']:.0f} | {r['final_loss']:.3f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only-against-trl", action="store_true", help="the first table alone")
    args = parser.parse_args()
    model = base_model()
    against_trl(model, args.examples, args.batch_size)
    if args.only_against_trl:
        return 0
    print("Chat tokenization: one render against prefix by prefix (one conversation, best of 3)\n")
    print("| messages | one render s | µs/message | prefix by prefix s | µs/message | ratio |")
    print("|---|---|---|---|---|---|")
    for r in tokenization_rows(model):
        n, one, per = r["messages"], r["one_render"], r["per_prefix"]
        print(f"| {n} | {one:.3f} | {one / n * 1e6:.0f} | {per:.3f} | {per / n * 1e6:.0f} | {per / one:.1f}x |")
    print("\n(identical loss masks at every size)\n")
    lines = sample_lines(args.examples)
    nf4, peer = (run_variant(model, lines, args.batch_size, quantization=q) for q in ("nf4", "none"))
    table("Quantisation: NF4 + LoRA against bf16 + LoRA (sample data)", [nf4, peer], "quantization")
    print(
        f"\nNF4/bf16 ratios: speed {nf4['tokens_per_second'] / peer['tokens_per_second']:.2f}x, "
        f"peak memory {nf4['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x\n"
    )
    mixed = mixed_length_lines(args.examples)
    packed, padded = (run_variant(model, mixed, args.batch_size, packing=p) for p in (True, False))
    table("Packing on against off (NF4, conversations of mixed length)", [packed, padded], "packing")
    print(
        f"\npacked/padded ratios: speed {packed['tokens_per_second'] / padded['tokens_per_second']:.2f}x, "
        f"wall {packed['wall_seconds'] / padded['wall_seconds']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
