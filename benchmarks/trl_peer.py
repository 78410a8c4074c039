"""The peer in `make bench`'s first table: what a user would write instead of tunequeue, TRL's `SFTTrainer` with
its defaults on a bitsandbytes NF4 base and a PEFT LoRA adapter. Runs in its own process:

    python -m benchmarks.trl_peer --base DIR --data train.jsonl --out DIR [--batch-size 8 ...]

trains one epoch, saves the adapter in --out and prints one JSON line: real (non-padding) tokens, the training
loop's seconds (model loading and tokenisation excluded), peak RSS and, on a GPU, peak CUDA memory.

Left at TRL's defaults on purpose: gradient checkpointing (on), no packing, padding to the longest example of
each batch, the loss over every token of the conversation (TRL trains on the prompt too unless told otherwise),
its optimizer (AdamW) and k-bit preparation of the model. Set to the recipe's values: batch size, epochs,
learning rate, schedule, warmup, weight decay, gradient clipping, seed, maximum length, compute dtype, LoRA."""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch


def load_quantised_base(base: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from worker.training.model import compute_dtype

    quantisation = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantisation, dtype=compute_dtype(), device_map=device
    )


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(args: argparse.Namespace):
    from trl import SFTConfig

    from worker.training.model import compute_dtype

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        max_length=args.max_length,
        bf16=compute_dtype() == torch.bfloat16,  # TRL's default is bf16 on; a CPU without it computes in float32
        use_cpu=not on_gpu,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )


class LoopClock:
    """Seconds from the first step's start to the last step's end: the training loop alone."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, *_, **__):
                clock.started = time.perf_counter()

            def on_train_end(self, *_, **__):
                clock.seconds = time.perf_counter() - clock.started

        self.callback = Callback()
        self.started = self.seconds = 0.0


def peak_memory() -> dict:
    memory = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        memory["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


def train(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    clock = LoopClock()
    trainer = SFTTrainer(
        model=load_quantised_base(args.base),
        args=sft_config(args),
        train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in records]),
        processing_class=AutoTokenizer.from_pretrained(args.base),
        peft_config=lora_config(),
        callbacks=[clock.callback],
    )
    real_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # one epoch: each example once
    result = trainer.train()
    trainer.save_model(str(args.out / "adapter"))
    return {
        "real_tokens": real_tokens,
        "loop_seconds": round(clock.seconds, 3),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "packing": trainer.args.packing,
        **peak_memory(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_peer", description=__doc__)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(train(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
