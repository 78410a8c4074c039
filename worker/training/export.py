"""A job's model exported as merged safetensors or as GGUF, with its fidelity measured against the model as trained:

    python -m worker.training.export --config cfg.json --adapter DIR --out DIR [--format merged|gguf]
        [--dtype D] [--quantization Q] [--base-weights W]

`cfg.json` is the job's own TrainingConfig (`worker.runner.config`). Writes `DIR/model/`: for `merged`, the
merged weights in shards (`merge`) with the base's config, generation config, tokenizer and chat template; for
`gguf`, one `.gguf` file (`gguf_export`, from a float32 merge) and an Ollama `Modelfile`; and
`tunequeue_export.json`, the export's manifest. Then loads both models — the quantised base with the adapter, as
the job trained and serves it, and the export with plain transformers (`from_pretrained`, with `gguf_file=` for a
GGUF, whose chat template must come back unchanged) — and compares them on the
job's validation examples (the first training examples when it has none): the largest difference of any logit at
a trained position, the mean KL divergence of the merged model's next-token distribution from the trained one's,
both models' loss, and both models' greedy answers to the first validation prompts. The export passes when the
merged model's loss is within `--max-loss-drift` (relative) of the trained model's.

Prints one JSON line, `{"manifest": path, "passed": bool, "summary": "…"}`; progress goes to stderr."""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from worker.training import comparison
from worker.training import data as chat_data
from worker.training.config import TrainingConfig
from worker.training.merge import Quantisation, merge
from worker.training.process import die_with_parent

MANIFEST = "tunequeue_export.json"
FORMAT = "tunequeue.export/1"
MAX_LOSS_DRIFT = 0.01  # the merged model's held-out loss within 1% of the model as trained
FIDELITY_EXAMPLES = 64  # validation examples compared, at most (each through both models)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def fidelity(reference, merged, examples, collate, batch_size: int) -> dict:
    """The merged model against the reference at every trained position of `examples`."""
    from worker.training.evaluation import labelled_logits

    max_delta, kl_sum, loss_ref, loss_merged, agree, positions = 0.0, 0.0, 0.0, 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        ref_logits, targets = labelled_logits(reference, batch)
        new_logits, _ = labelled_logits(merged, batch)
        ref_logits, new_logits = ref_logits.float(), new_logits.float()
        max_delta = max(max_delta, float((ref_logits - new_logits).abs().max()) if targets.numel() else 0.0)
        ref_log, new_log = ref_logits.log_softmax(-1), new_logits.log_softmax(-1)
        kl_sum += float((ref_log.exp() * (ref_log - new_log)).sum())
        loss_ref += float(torch.nn.functional.cross_entropy(ref_logits, targets, reduction="sum"))
        loss_merged += float(torch.nn.functional.cross_entropy(new_logits, targets, reduction="sum"))
        agree += int((ref_logits.argmax(-1) == new_logits.argmax(-1)).sum())
        positions += int(targets.numel())
    count = max(positions, 1)
    return {
        "positions": positions,
        "max_abs_logit_delta": round(max_delta, 6),
        "mean_kl": kl_sum / count,
        "loss_trained": loss_ref / count,
        "loss_merged": loss_merged / count,
        "loss_drift": abs(loss_merged - loss_ref) / max(loss_ref, 1e-12),
        "top1_agreement": agree / count,
    }


def export_model(config: TrainingConfig, adapter_dir: Path, out: Path, options: dict, max_loss_drift: float,
                 shard_bytes: int) -> dict:  # fmt: skip
    """`options`: format (merged, gguf), dtype (merged), quantization (gguf), base_weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.datasets.tokenization import ChatTokenizer
    from worker.training.gguf_export import modelfile, write_gguf
    from worker.training.manifest import library_versions
    from worker.training.model import compute_dtype, load_adapter_weights
    from worker.training.recipe import job_examples, lora_model, seed_everything

    started = time.monotonic()
    seed_everything(config.seed)
    folder = out / "model"
    gguf = options["format"] == "gguf"
    base_weights = options.get("base_weights", "nf4")
    four_bit = config.quantization in ("nf4", "fp4")
    if base_weights == "nf4" and not four_bit:
        base_weights = "original"  # the job trained on a base that was not 4-bit: its own weights are those
    quantisation = Quantisation(quant_type=config.quantization if four_bit else "nf4", input_dtype=compute_dtype())

    def progress(what: str):
        def report(done: int, total: int) -> None:
            if done == total or done % 50 == 0:
                log(f"{what}: {done}/{total} tensors")

        return report

    merged_dir = out / "merged" if gguf else folder
    dtype = "float32" if gguf else options.get("dtype", "bfloat16")  # a GGUF's tensors are rounded once, from float32
    merged_info = merge(Path(config.base_model_path), adapter_dir, merged_dir, dtype, base_weights, quantisation,
                        shard_bytes, progress("merging"))  # fmt: skip
    export_info: dict = {"format": options["format"], **merged_info}
    if gguf:
        name = f"{config.job_id or 'model'}-{options['quantization']}.gguf"
        folder.mkdir(parents=True, exist_ok=True)
        written = write_gguf(merged_dir, folder / name, options["quantization"], config.job_id or config.base_model_id
                             or "model", progress("writing GGUF"))  # fmt: skip
        shutil.rmtree(merged_dir)
        template = AutoTokenizer.from_pretrained(config.base_model_path).chat_template
        eos = ChatTokenizer(config.base_model_path).special["eos_token"]
        stops = [eos] if eos else []
        (folder / "Modelfile").write_text(modelfile(name, template, stops))
        export_info = {**export_info, **written, "file": name, "dtype": None}
    log("measuring fidelity against the quantised base with the adapter")
    tokenizer = ChatTokenizer(config.base_model_path)
    train_set, valid_set = job_examples(config, tokenizer)
    examples = (valid_set or train_set)[:FIDELITY_EXAMPLES]
    reference = lora_model(config)
    load_adapter_weights(reference, adapter_dir)
    in_float32(reference).eval()
    if gguf:
        merged = AutoModelForCausalLM.from_pretrained(folder, gguf_file=export_info["file"], dtype=torch.float32).eval()
        round_trip = AutoTokenizer.from_pretrained(folder, gguf_file=export_info["file"]).chat_template
        export_info["chat_template_round_trip"] = round_trip == template
    else:
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    collate = chat_data.Collator.for_tokenizer(tokenizer, False, reference.device)
    figures = fidelity(reference, merged, examples, collate, config.batch_size)
    kind, records = comparison.validation_records(config.train_file, config.validation_file, config.seed)
    prompts = comparison.sample_prompts(
        tokenizer, kind, records, config.evaluation_prompts, config.max_seq_length
    ) or comparison.sample_prompts(tokenizer, *chat_data.read_records(config.train_file), 3, config.max_seq_length)
    samples = answers_side_by_side(reference, merged, tokenizer, prompts, config.evaluation_max_new_tokens)
    passed = figures["loss_drift"] <= max_loss_drift and export_info.get("chat_template_round_trip", True)
    manifest = {
        "format": FORMAT,
        "job_id": config.job_id,
        "base_model": config.base_model_id,
        "export": export_info,
        "fidelity": {
            **figures,
            "examples": len(examples),
            "examples_from": "validation" if valid_set else "training",
            "greedy_matches": sum(1 for s in samples if s["match"]),
            "samples": samples,
            "reference": f"the {config.quantization} base with the adapter (its weights as trained), and the export "
            "loaded by transformers, both computing in float32",
            "bounds": {"max_loss_drift": max_loss_drift},
            "passed": passed,
        },
        "libraries": library_versions(),
        "seconds": round(time.monotonic() - started, 2),
        "created_at": int(time.time()),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def in_float32(model):
    """The same model computing in float32: its 4-bit layers dequantise into float32 (exactly: their values are
    numbers of the dtype they were quantised from) and every other weight is cast up. The differences then
    measured are the export's (the merge, its dtype, the GGUF's quantisation), not those of bf16 arithmetic."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
    for tensor in [*model.parameters(), *model.buffers()]:
        if not isinstance(tensor, bnb.nn.Params4bit) and tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()
    return model


def answers_side_by_side(reference, merged, tokenizer, prompts, max_new_tokens: int) -> list[dict]:
    """Both models' greedy answers to the same prompts, and whether they match."""
    if not prompts:
        return []
    ids = [prompt.ids for prompt in prompts]
    trained = comparison.greedy_answers(reference, tokenizer, ids, max_new_tokens)
    exported = comparison.greedy_answers(merged, tokenizer, ids, max_new_tokens)
    return [
        {"prompt": p.text, "trained": a, "merged": b, "match": a == b}
        for p, a, b in zip(prompts, trained, exported, strict=True)
    ]


def summary(manifest: dict) -> str:
    figures, export = manifest["fidelity"], manifest["export"]
    verdict = "within" if figures["passed"] else "OUTSIDE"
    made = f"GGUF {export['quantization']}" if export["format"] == "gguf" else export["dtype"]
    template = ""
    if export.get("chat_template_round_trip") is False:
        template = "; the chat template did NOT come back from the GGUF unchanged"
    return (
        f"Merged {export['merged_weights']} LoRA weights into the {export['base_weights']} base, {made}: "
        f"loss {figures['loss_merged']:.4f} against {figures['loss_trained']:.4f} as trained "
        f"(drift {figures['loss_drift']:.2%}, {verdict} the bound of {figures['bounds']['max_loss_drift']:.0%}), "
        f"max |Δlogit| {figures['max_abs_logit_delta']:.4f}, mean KL {figures['mean_kl']:.2e}, greedy answers "
        f"matching {figures['greedy_matches']}/{len(figures['samples'])}{template}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training.export", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="the job's TrainingConfig as JSON")
    parser.add_argument("--adapter", type=Path, required=True, help="the delivered adapter's folder")
    parser.add_argument("--out", type=Path, required=True, help="where model/ is written")
    parser.add_argument("--format", default="merged", choices=("merged", "gguf"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--quantization", default="q8_0", choices=("f16", "q8_0"), help="of a GGUF")
    parser.add_argument("--base-weights", default="nf4", choices=("nf4", "original"))
    parser.add_argument("--max-loss-drift", type=float, default=MAX_LOSS_DRIFT)
    parser.add_argument("--shard-mb", type=int, default=2048, help="the largest weight shard, in MiB")
    args = parser.parse_args(argv)
    die_with_parent()
    config = TrainingConfig.model_validate_json(args.config.read_text())
    options = {"format": args.format, "dtype": args.dtype, "quantization": args.quantization,
               "base_weights": args.base_weights}  # fmt: skip
    manifest = export_model(config, args.adapter, args.out, options, args.max_loss_drift, args.shard_mb * 2**20)
    print(json.dumps({"manifest": str(args.out / "model" / MANIFEST), "passed": manifest["fidelity"]["passed"],
                      "summary": summary(manifest)}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
