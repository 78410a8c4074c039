"""`make bench-numerics`: what a bf16 compute dtype does to SmolLM2-135M-Instruct's held-out loss, by how its norm
layers compute.

The NF4 base, quantised once, scores the held-out chats (`tunequeue/sample/heldout.jsonl`) four ways:
- computing in float32 throughout (`export.in_float32`): the reference;
- bf16 with the norm layers in bf16, as transformers loads them (each norm rounds twice);
- bf16 with the norm layers in float32 (`model.norms_in_float32`, the recipe's way): one rounding per norm, the
  stream between layers in bf16;
- bf16 after PEFT's `prepare_model_for_kbit_training`: every weight that is not 4-bit (norms, embeddings, the
  tied output layer) in float32, which leaves the activations after the first norm in float32 too.
For each: held-out loss per trained token, its drift from the reference, the largest logit difference at a
trained position, the mean KL divergence from the reference, and top-1 agreement.

bf16 is forced where the CPU lacks it (an AVX2-only CPU then runs bf16 matmuls in a slow reference kernel, so
this takes minutes there); the figures are the arithmetic's, whatever the CPU.

    python -m benchmarks.numerics [--examples N]"""

import argparse
import platform
import time

import torch

from benchmarks.run import ROOT, base_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.numerics", description=__doc__)
    parser.add_argument("--examples", type=int, default=8, help="held-out chats to score (of 24)")
    args = parser.parse_args(argv)
    from peft import prepare_model_for_kbit_training

    from benchmarks.export import collate_for
    from shared.datasets.tokenization import ChatTokenizer
    from worker.training import data as chat_data
    from worker.training import model as recipe_model
    from worker.training.export import fidelity, in_float32

    native = recipe_model.compute_dtype()
    recipe_model.compute_dtype = lambda: torch.bfloat16  # the loads below quantise and compute as on a bf16 CPU
    path = base_model()
    tokenizer = ChatTokenizer(path)
    kind, records = chat_data.read_records(ROOT / "tunequeue/sample/heldout.jsonl")
    examples = chat_data.encode_records(tokenizer, kind, records[: args.examples], 1024)
    collate = collate_for(tokenizer)
    print(f"{platform.processor() or platform.machine()}, native compute dtype {native}; {len(examples)} held-out "
          f"chats, {sum(e.loss_tokens for e in examples)} trained tokens", flush=True)  # fmt: skip

    def load(float32_norms: bool):
        float32_norms_of = recipe_model.norms_in_float32
        if not float32_norms:
            recipe_model.norms_in_float32 = lambda model: 0
        try:
            return recipe_model.load_base_model(path).eval()
        finally:
            recipe_model.norms_in_float32 = float32_norms_of

    reference = in_float32(load(float32_norms=False))
    variants = {
        "bf16, norms in bf16 (as loaded)": lambda: load(float32_norms=False),
        "bf16, norms in float32 (tunequeue)": lambda: load(float32_norms=True),
        "bf16, PEFT prepare_model_for_kbit_training": lambda: prepare_model_for_kbit_training(
            load(float32_norms=False), use_gradient_checkpointing=False
        ).eval(),
    }
    rows = {}
    for name, build in variants.items():
        started = time.monotonic()
        with torch.no_grad():
            rows[name] = fidelity(reference, build(), examples, collate, 4)
        print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)
    print(f"\nheld-out loss computing in float32 (the reference): {next(iter(rows.values()))['loss_trained']:.4f}\n")
    print("| compute | held-out loss | drift | max abs dlogit | mean KL | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['loss_merged']:.4f} | {row['loss_drift']:.3%} | {row['max_abs_logit_delta']:.3f} | "
              f"{row['mean_kl']:.2e} | {row['top1_agreement']:.2%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
