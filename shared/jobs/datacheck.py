"""A job's data checked against its base model before any GPU time: the structure of both files, then
statistics under the model's tokenizer and chat template (`shared.datasets.report`). Used by the worker's
validating_files step and by the API's dry run, so both say the same thing."""

from dataclasses import dataclass

from shared.basemodels.models import BaseModelRecord
from shared.basemodels.service import ensure_local_copy
from shared.datasets.report import build_report
from shared.datasets.tokenization import TOKENIZER_FILES, ChatTokenizer
from shared.datasets.validation import MIN_EXAMPLES, validate_jsonl
from shared.files.models import File
from shared.settings import Settings
from shared.storage import Storage


@dataclass
class DataCheck:
    ok: bool
    report: dict
    param: str | None = None

    def message(self) -> str:
        file = self.param or "training_file"
        errors = self.report.get("errors") or []
        shown = "; ".join(f"line {e['line']}: {e['message']}" for e in errors[:5])
        more = f" (and {self.report['error_count'] - 5} more)" if self.report.get("error_count", 0) > 5 else ""
        return f"{file} is not usable: {shown}{more}"


def check_job_data(
    storage: Storage,
    settings: Settings,
    model: BaseModelRecord,
    training: File,
    validation: File | None,
    *,
    max_seq_length: int,
    train_on_inputs: bool,
) -> DataCheck:
    structure = validate_jsonl(storage.get_bytes(training.storage_key), min_examples=MIN_EXAMPLES, keep_records=True)
    valid_structure = None
    if validation is not None:
        valid_structure = validate_jsonl(storage.get_bytes(validation.storage_key), keep_records=True)
        if not valid_structure.ok:
            return DataCheck(False, {"training": structure.to_dict(), **valid_structure.to_dict()}, "validation_file")
    if not structure.ok:
        return DataCheck(False, structure.to_dict(), "training_file")
    if valid_structure is not None and valid_structure.format != structure.format:
        structure.error(
            1, f"the validation file is in {valid_structure.format} format, the training file in {structure.format}"
        )
    folder = ensure_local_copy(model, storage, settings.resolved_model_dir, only=TOKENIZER_FILES)
    report = build_report(
        structure,
        ChatTokenizer(folder),
        max_seq_length=max_seq_length,
        train_on_inputs=train_on_inputs,
        validation=valid_structure,
    )
    return DataCheck(structure.ok, report, None if structure.ok else "training_file")
