"""`make bench-export`: what each way of merging a QLoRA adapter gives, on SmolLM2-135M-Instruct.

Trains one adapter with the recipe (the demo's sample data, 1 epoch, `python -m worker.training`), then compares
with the model as trained (the NF4 base with the adapter, computing in float32) on the held-out chats
(`tunequeue/sample/heldout.jsonl`, none of them in the training data):
- tunequeue's merge into the NF4-dequantised base weights and into the original 16-bit weights, each in bfloat16
  and float32 (`worker.training.merge`, each in its own process, with its wall time and peak RSS);
- the naive merge users hit elsewhere: PEFT's `merge_and_unload()` on the 4-bit model, which rounds each merged
  weight back to 4 bits.
- GGUF files (f16, q8_0) written from the float32 merge, read back with transformers (`gguf_file=`);
- the model as trained computing in the recipe's own dtype (bf16 where the CPU has it): what arithmetic alone moves.
For each: held-out loss per trained token, the largest difference of any logit at a trained position, the mean KL
divergence from the trained model's next-token distribution, top-1 agreement, and whether each greedy answer to
the held-out prompts (48 tokens) matches the trained model's. The merged models compute in float32.

    python -m benchmarks.export [--epochs N]"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.run import ROOT, base_model, recipe_env, sample_lines

MEASURED = """
import json, resource, sys, time
from pathlib import Path
from worker.training.merge import Quantisation, merge
from worker.training.model import compute_dtype
started = time.monotonic()
info = merge(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5],
             Quantisation(input_dtype=compute_dtype()))
info["seconds"] = round(time.monotonic() - started, 2)
info["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(info))
"""


def train_adapter(model: Path, out: Path, epochs: int) -> Path:
    data = out / "train.jsonl"
    data.write_text("\n".join(sample_lines(200)) + "\n")
    config = out / "cfg.json"
    settings = {"n_epochs": epochs, "batch_size": 8, "seed": 0, "n_checkpoints": 0, "evaluation_prompts": 0}
    config.write_text(json.dumps({"base_model_path": str(model), "train_file": str(data), **settings}))
    subprocess.run([sys.executable, "-m", "worker.training", "--config", str(config), "--out", str(out / "run")],
                   check=True, cwd=ROOT, env=recipe_env(), stdout=subprocess.DEVNULL)  # fmt: skip
    return out / "run" / "adapter"


@torch.no_grad()
def compare(reference, candidate, examples, prompts, tokenizer) -> dict:
    from worker.training.comparison import greedy_answers
    from worker.training.export import fidelity

    collate = collate_for(tokenizer)
    figures = fidelity(reference, candidate, examples, collate, 4)
    ids = [p.ids for p in prompts]
    figures["greedy"] = (greedy_answers(reference, tokenizer, ids, 48), greedy_answers(candidate, tokenizer, ids, 48))
    return figures


def collate_for(tokenizer):
    from worker.training import data as chat_data

    return chat_data.Collator.for_tokenizer(tokenizer, False, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shared.datasets.tokenization import ChatTokenizer
    from worker.training import comparison
    from worker.training import data as chat_data
    from worker.training.export import in_float32
    from worker.training.gguf_export import write_gguf
    from worker.training.model import compute_dtype, load_base_model

    model = base_model()
    heldout = ROOT / "tunequeue/sample/heldout.jsonl"
    tokenizer = ChatTokenizer(model)
    kind, records = chat_data.read_records(heldout)
    examples = chat_data.encode_records(tokenizer, kind, records, 1024)
    prompts = comparison.sample_prompts(tokenizer, kind, records, 5, 1024)
    print(f"{platform.processor() or platform.machine()}, compute dtype {compute_dtype()}, {len(examples)} held-out "
          f"chats, {len(prompts)} prompts", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        started = time.monotonic()
        adapter = train_adapter(model, out, args.epochs)
        print(f"trained the adapter in {time.monotonic() - started:.0f} s", flush=True)
        reference = in_float32(PeftModel.from_pretrained(load_base_model(model), adapter)).eval()
        bf16 = PeftModel.from_pretrained(load_base_model(model), adapter).eval()
        rows = {"the model as trained, computing in the recipe's dtype": compare(reference, bf16, examples, prompts,
                                                                                  tokenizer)}  # fmt: skip
        del bf16
        for base_weights in ("nf4", "original"):
            for dtype in ("bfloat16", "float16", "float32") if base_weights == "nf4" else ("bfloat16",):
                folder = out / f"{base_weights}-{dtype}"
                command = [sys.executable, "-c", MEASURED, str(model), str(adapter), str(folder), dtype, base_weights]
                result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
                merged_info = json.loads(result.stdout.splitlines()[-1])
                merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                rows[f"tunequeue, {base_weights} weights, {dtype}"] = {
                    **compare(reference, merged, examples, prompts, tokenizer), **merged_info
                }  # fmt: skip
                del merged
        for quantization in ("f16", "q8_0"):
            folder = out / f"gguf-{quantization}"
            write_gguf(out / "nf4-float32", folder / "model.gguf", quantization, "bench")
            gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
            size = (folder / "model.gguf").stat().st_size
            rows[f"GGUF {quantization} (from the nf4 float32 merge), {size / 2**20:.0f} MiB"] = compare(
                reference, gguf, examples, prompts, tokenizer
            )
            del gguf
        naive = in_float32(PeftModel.from_pretrained(load_base_model(model), adapter).merge_and_unload()).eval()
        rows["naive: merge_and_unload() on the 4-bit model"] = compare(reference, naive, examples, prompts, tokenizer)
    trained_loss = next(iter(rows.values()))["loss_trained"]
    print(f"\nheld-out loss of the model as trained (NF4 base + adapter, float32 arithmetic): {trained_loss:.4f}\n")
    print("| merge | held-out loss | drift | max abs dlogit | mean KL | top-1 agreement | greedy answers matching | "
          "merge s | peak RSS MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        trained, merged = row["greedy"]
        matches = sum(a == b for a, b in zip(trained, merged, strict=True))
        print(f"| {name} | {row['loss_merged']:.4f} | {row['loss_drift']:.2%} | {row['max_abs_logit_delta']:.3f} | "
              f"{row['mean_kl']:.2e} | {row['top1_agreement']:.2%} | {matches}/{len(trained)} | "
              f"{row.get('seconds', '')} | {row.get('peak_rss_mib', '')} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
