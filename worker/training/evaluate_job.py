"""The evaluation a job ends with, made again for a job that has none, from its delivered adapter:

    python -m worker.training.evaluate_job --config cfg.json --adapter DIR --out DIR

`cfg.json` is the job's own TrainingConfig, built as its training was (`worker.runner.config`), so the
validation set is the one it trained against: its validation file, or the share of the training file held out
by its seed, tokenised with the same template, length and masking. The base model is scored with a fresh LoRA
(its update is zero: the base model's output, as the recipe's score before its first step), then the delivered
adapter's weights are put in and scored, and both models answer the first validation prompts side by side
(`comparison`). Writes `DIR/evaluation.json` and prints one JSON line, `{"evaluation": path}`; exits 1 with the
error on stderr."""

import argparse
import json
import sys
import time
from pathlib import Path

from worker.training import comparison
from worker.training import data as chat_data
from worker.training.config import TrainingConfig
from worker.training.process import die_with_parent


def delivered_adapter(adapter_dir: Path, config: TrainingConfig) -> dict:
    """Which adapter the job delivered (selection and step), from its manifest."""
    manifest_file = adapter_dir / "manifest.json"
    metrics = json.loads(manifest_file.read_text()).get("metrics", {}) if manifest_file.is_file() else {}
    return metrics.get("adapter") or {"selection": config.adapter_selection, "step": metrics.get("step")}


def evaluate_job(config: TrainingConfig, adapter_dir: Path) -> dict:
    from shared.datasets.tokenization import ChatTokenizer
    from worker.training.evaluation import validation_metrics
    from worker.training.model import load_adapter_weights
    from worker.training.packed_attention import per_sequence_attention
    from worker.training.recipe import job_examples, lora_model, seed_everything

    started = time.monotonic()
    seed_everything(config.seed)
    tokenizer = ChatTokenizer(config.base_model_path)
    _, valid_set = job_examples(config, tokenizer)
    adapter = delivered_adapter(adapter_dir, config)
    if not valid_set:
        return comparison.build_evaluation({}, {}, adapter, 0, [])
    model = lora_model(config)
    collate = chat_data.Collator.for_tokenizer(tokenizer, config.packing, model.device, per_sequence_attention(model))
    initial = validation_metrics(model, valid_set, config.batch_size, collate)
    load_adapter_weights(model, adapter_dir)
    delivered = validation_metrics(model, valid_set, config.batch_size, collate)
    kind, records = comparison.validation_records(config.train_file, config.validation_file, config.seed)
    prompts = comparison.sample_prompts(tokenizer, kind, records, config.evaluation_prompts, config.max_seq_length)
    samples = comparison.side_by_side(model, tokenizer, prompts, config.evaluation_max_new_tokens)
    seconds = round(time.monotonic() - started, 2)
    return comparison.build_evaluation(
        initial, delivered, adapter, len(valid_set), samples,
        max_new_tokens=config.evaluation_max_new_tokens, seconds=seconds,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training.evaluate_job", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="the job's TrainingConfig as JSON")
    parser.add_argument("--adapter", type=Path, required=True, help="the delivered adapter's folder")
    parser.add_argument("--out", type=Path, required=True, help="where evaluation.json is written")
    args = parser.parse_args(argv)
    die_with_parent()
    config = TrainingConfig.model_validate_json(args.config.read_text())
    evaluation = evaluate_job(config, args.adapter)
    args.out.mkdir(parents=True, exist_ok=True)
    path = comparison.write_evaluation(args.out, evaluation)
    print(json.dumps({"evaluation": str(path), "summary": comparison.summary(evaluation)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
