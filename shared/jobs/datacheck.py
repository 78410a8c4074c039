"""A job's data checked against its base model before any GPU time: the structure of both files and
statistics under the model's tokenizer and chat template (`shared.datasets.report`), in one pass over each
file as it streams from storage. Used by the worker's validating_files step and by the API's dry run, so both
say the same thing. Memory holds a line and the running figures, never the file or its records."""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shared.basemodels.models import BaseModelRecord
from shared.basemodels.service import ensure_local_copy
from shared.datasets.report import ExampleStatistics
from shared.datasets.tokenization import TOKENIZER_FILES, ChatTokenizer
from shared.datasets.validation import MIN_EXAMPLES, JsonlValidator
from shared.errors import TunequeueError
from shared.files.models import File
from shared.settings import Settings
from shared.storage import Storage


class DataCheckTimedOut(TunequeueError):
    status_code = 408
    code = "dry_run_timeout"


def timed_out(settings: Settings) -> DataCheckTimedOut:
    return DataCheckTimedOut(
        f"checking the data took longer than the dry run's limit of {settings.dry_run_timeout_seconds:g} seconds "
        "(TUNEQUEUE_DRY_RUN_TIMEOUT_SECONDS); create the job instead: its data is validated on a worker, and a "
        "failed validation costs no GPU time",
    )


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
    deadline: float | None = None,
    on_progress: Callable[[], None] | None = None,
) -> DataCheck:
    """`deadline` (time.monotonic()) bounds the time taken, checked between lines: past it, DataCheckTimedOut.
    `on_progress` is called every few thousand lines (the worker renews its claim on the job there)."""
    folder = ensure_local_copy(model, storage, settings.resolved_model_dir, only=TOKENIZER_FILES)
    validator = JsonlValidator(min_examples=MIN_EXAMPLES, max_messages=settings.max_messages_per_example)
    statistics = ExampleStatistics(
        ChatTokenizer(folder),
        validator.report,
        max_seq_length=max_seq_length,
        train_on_inputs=train_on_inputs,
        max_tokens=settings.max_tokens_per_example,
    )
    for record in _examples(storage, training, validator, deadline, settings, on_progress):
        if validator.report.ok:  # once the structure is wrong only the structure is reported
            statistics.add(record)
    structure = validator.finish()
    valid_structure, overlap = None, 0
    if validation is not None:
        valid_validator = JsonlValidator(max_messages=settings.max_messages_per_example)
        for record in _examples(storage, validation, valid_validator, deadline, settings, on_progress):
            overlap += statistics.holds(record)
        valid_structure = valid_validator.finish()
        if not valid_structure.ok:
            return DataCheck(False, {"training": structure.to_dict(), **valid_structure.to_dict()}, "validation_file")
    if not structure.ok:
        return DataCheck(False, structure.to_dict(), "training_file")
    if valid_structure is not None and valid_structure.format != structure.format:
        structure.error(
            1, f"the validation file is in {valid_structure.format} format, the training file in {structure.format}"
        )
    report = statistics.report(valid_structure, overlap)
    return DataCheck(structure.ok, report, None if structure.ok else "training_file")


def _examples(
    storage: Storage,
    file: File,
    validator: JsonlValidator,
    deadline: float | None,
    settings: Settings,
    on_progress: Callable[[], None] | None,
) -> Iterator[dict]:
    for count, record in enumerate(validator.feed_all(storage.iter_chunks(file.storage_key)), start=1):
        if deadline is not None and time.monotonic() > deadline:
            raise timed_out(settings)
        if on_progress is not None and count % 2000 == 0:
            on_progress()
        yield record
