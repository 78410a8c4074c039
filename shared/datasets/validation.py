"""Structural checks of a fine-tuning JSONL file. Pure Python: the API runs them at upload, the worker again
before training. Three formats are recognised per line and a file must stick to one:

- chat: {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1}, ...]} (OpenAI's)
- prompt/completion: {"prompt": str, "completion": str}
- text: {"text": str}

Errors and warnings carry line numbers; the first 20 of each are kept and all are counted. Files are read as a
stream of chunks (`JsonlValidator`): memory holds one line at a time, never the file."""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

CHAT, PROMPT_COMPLETION, TEXT = "chat", "prompt_completion", "text"
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "weight", "name"}
MAX_SHOWN = 20
MAX_LINE_BYTES = 1024 * 1024
MIN_EXAMPLES = 10


@dataclass
class Issue:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ValidationReport:
    format: str | None = None
    examples: int = 0
    errors: list[Issue] = field(default_factory=list)
    error_count: int = 0
    warnings: list[Issue] = field(default_factory=list)
    warning_count: int = 0
    records: list[dict] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def error(self, line: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_SHOWN:
            self.errors.append(Issue(line, message))

    def warn(self, line: int, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_SHOWN:
            self.warnings.append(Issue(line, message))

    def summary(self) -> str:
        shown = "; ".join(str(error) for error in self.errors[:5])
        more = f" (and {self.error_count - 5:,} more)" if self.error_count > 5 else ""
        return f"{self.error_count:,} problem(s): {shown}{more}"

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "examples": self.examples,
            "error_count": self.error_count,
            "errors": [{"line": e.line, "message": e.message} for e in self.errors],
            "warning_count": self.warning_count,
            "warnings": [{"line": w.line, "message": w.message} for w in self.warnings],
        }


def validate_jsonl(
    data: bytes,
    *,
    min_examples: int = 0,
    keep_records: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_lines: int | None = None,
    max_messages: int | None = None,
) -> ValidationReport:
    """A whole file in memory at once: for the recipe, which trains on every record anyway, and for tests."""
    validator = JsonlValidator(
        min_examples=min_examples, max_line_bytes=max_line_bytes, max_lines=max_lines, max_messages=max_messages
    )
    for record in validator.feed(data):
        if keep_records:
            validator.report.records.append(record)
    return validator.finish()


class JsonlValidator:
    """Checks a JSONL file as its chunks arrive; `feed` yields each accepted example (with its "line") so
    that a caller can gather statistics without keeping records. Memory is bounded by one line (at most
    `max_line_bytes`; a longer one is counted, not kept) plus one chunk."""

    def __init__(
        self,
        *,
        min_examples: int = 0,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_lines: int | None = None,
        max_messages: int | None = None,
    ):
        self.report = ValidationReport()
        self.min_examples = min_examples
        self.max_line_bytes = max_line_bytes
        self.max_lines = max_lines
        self.max_messages = max_messages
        self.stopped = False  # past max_lines: nothing more is read
        self._pending = bytearray()
        self._oversize = 0  # bytes of the current line when it is over max_line_bytes (and so not kept)
        self._number = 0
        self._crlf_seen = False

    def feed(self, chunk: bytes) -> Iterator[dict]:
        """The examples whose line ends in `chunk`."""
        start = 0
        while not self.stopped:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                self._hold(chunk[start:])
                return
            self._hold(chunk[start:newline])
            start = newline + 1
            record = self._line(last=False)
            if record is not None:
                yield record

    def feed_all(self, chunks: Iterable[bytes]) -> Iterator[dict]:
        for chunk in chunks:
            yield from self.feed(chunk)
            if self.stopped:
                return
        if (self._pending or self._oversize) and not self.stopped:
            record = self._line(last=True)
            if record is not None:
                yield record

    def finish(self) -> ValidationReport:
        """Ends the file (its last line needs no newline) and applies the whole-file checks."""
        if (self._pending or self._oversize) and not self.stopped:
            self._line(last=True)
        report = self.report
        if report.ok and report.examples == 0:
            report.error(1, "the file holds no examples")
        elif report.ok and report.examples < self.min_examples:
            report.error(1, f"the file holds {report.examples} examples; at least {self.min_examples} are needed")
        return report

    def _hold(self, piece: bytes) -> None:
        if self._oversize:
            self._oversize += len(piece)
        elif len(self._pending) + len(piece) > self.max_line_bytes + 1:  # + 1: a CR before the newline
            self._oversize = len(self._pending) + len(piece)
            self._pending.clear()
        else:
            self._pending += piece

    def _line(self, last: bool) -> dict | None:
        self._number += 1
        number, raw, oversize = self._number, bytes(self._pending), self._oversize
        self._pending.clear()
        self._oversize = 0
        if self.max_lines is not None and number > self.max_lines:
            self.report.error(
                number, f"the file has more than {self.max_lines:,} lines (TUNEQUEUE_MAX_FILE_LINES); split it"
            )
            self.stopped = True
            return None
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
            self.report.warn(1, "a UTF-8 byte order mark was ignored")
        if raw.endswith(b"\r") and not last and not self._crlf_seen:
            self._crlf_seen = True
            self.report.warn(1, "Windows (CRLF) line ends were read as plain line ends")
        if oversize:
            self.report.error(
                number, f"is {oversize:,} bytes, over the {self.max_line_bytes:,}-byte limit for one example"
            )
            return None
        return self._example(number, raw.rstrip(b"\r"), last)

    def _example(self, number: int, raw: bytes, last: bool) -> dict | None:
        report = self.report
        if not raw.strip():
            if not last:
                report.warn(number, "blank line skipped")
            return None
        record = _parse_line(report, number, raw, self.max_line_bytes)
        if record is None:
            return None
        kind = _check_record(report, number, record, self.max_messages)
        if kind is None:
            return None
        if report.format is None:
            report.format = kind
        elif kind != report.format:
            report.error(number, f"is in {kind} format but the file started in {report.format} format; use one")
            return None
        report.examples += 1
        return {"line": number, **record}


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _parse_line(report: ValidationReport, number: int, raw: bytes, max_line_bytes: int = MAX_LINE_BYTES) -> dict | None:
    if len(raw) > max_line_bytes:
        report.error(number, f"is {len(raw):,} bytes, over the {max_line_bytes:,}-byte limit for one example")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.error(number, f"is not valid UTF-8 (byte {exc.start + 1})")
        return None
    try:
        record = json.loads(text, parse_constant=_no_constants)  # NaN and Infinity are not JSON
    except RecursionError:
        report.error(number, "is nested too deeply to be an example")
        return None
    except json.JSONDecodeError as exc:
        report.error(number, f"is not valid JSON ({exc.msg} at column {exc.colno})")
        return None
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        report.error(number, f"is not valid JSON ({str(exc).split(';')[0]})")
        return None
    if not isinstance(record, dict):
        report.error(number, 'must be a JSON object such as {"messages": [...]}')
        return None
    return record


def _check_record(report: ValidationReport, number: int, record: dict, max_messages: int | None = None) -> str | None:
    if "messages" in record:
        kind, problem = CHAT, _check_chat(report, number, record, max_messages)
        extra = set(record) - {"messages"}
    elif "prompt" in record or "completion" in record:
        kind, problem = PROMPT_COMPLETION, _check_strings(record, ("prompt", "completion"))
        extra = set(record) - {"prompt", "completion"}
    elif "text" in record:
        kind, problem = TEXT, _check_strings(record, ("text",))
        extra = set(record) - {"text"}
    else:
        report.error(number, 'has none of "messages", "prompt"/"completion" or "text"')
        return None
    if problem:
        report.error(number, problem)
        return None
    if extra:
        report.warn(number, f"unknown key(s) ignored: {', '.join(sorted(extra))}")
    return kind


def _check_strings(record: dict, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if key not in record:
            return f'needs "{key}"'
        if not isinstance(record[key], str):
            return f'"{key}" must be a string'
    if not record[keys[-1]].strip():
        return f'"{keys[-1]}" is empty'
    return None


def _check_chat(report: ValidationReport, number: int, record: dict, max_messages: int | None = None) -> str | None:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    if max_messages is not None and len(messages) > max_messages:
        return (
            f"holds {len(messages):,} messages, over the limit of {max_messages:,} per example "
            "(TUNEQUEUE_MAX_MESSAGES_PER_EXAMPLE); split the conversation into shorter examples"
        )
    previous = None
    for index, message in enumerate(messages):
        problem = _check_message(index, message)
        if problem:
            return problem
        role = message["role"]
        if role == "system" and previous not in (None, "system"):
            return f"messages[{index}]: a system message may only come first"
        if role in ("user", "assistant") and role == previous:
            return f"messages[{index}]: two {role} messages in a row; user and assistant must alternate"
        if role == "assistant" and previous in (None, "system"):
            return f"messages[{index}]: the conversation must start with a user message"
        if set(message) - MESSAGE_KEYS:
            report.warn(
                number, f"messages[{index}]: unknown key(s) ignored: {', '.join(sorted(set(message) - MESSAGE_KEYS))}"
            )
        previous = role
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        return "has no assistant message to learn from"
    return None


def _check_message(index: int, message: object) -> str | None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        return f'{where} must be an object with "role" and "content"'
    role = message.get("role")
    if role not in ROLES:
        return f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}"
    content = message.get("content")
    if not isinstance(content, str):
        return f"{where}.content must be a string, got {type(content).__name__}"
    if not content.strip():
        return f"{where}.content is empty"
    if message.get("weight", 1) not in (0, 1) or isinstance(message.get("weight"), bool):
        return f"{where}.weight must be 0 or 1"
    return None
