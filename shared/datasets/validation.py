"""Structural checks of a chat-format JSONL training file (OpenAI's format). Pure Python: runs in the API
at upload time and in the worker before training. Errors name the line."""

import json
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 20
MIN_EXAMPLES = 1


@dataclass
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ValidationReport:
    examples: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def add(self, line: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_SHOWN:
            self.errors.append(LineError(line, message))

    def summary(self) -> str:
        shown = "; ".join(str(error) for error in self.errors[:5])
        more = f" (and {self.error_count - 5} more)" if self.error_count > 5 else ""
        return f"{self.error_count} invalid line(s): {shown}{more}"

    def to_dict(self) -> dict:
        return {
            "examples": self.examples,
            "error_count": self.error_count,
            "errors": [{"line": e.line, "message": e.message} for e in self.errors],
        }


def validate_chat_jsonl(data: bytes) -> ValidationReport:
    report = ValidationReport()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        report.add(line, "is not valid UTF-8")
        return report
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        problem = _check_line(raw)
        if problem:
            report.add(number, problem)
        else:
            report.examples += 1
    if report.ok and report.examples < MIN_EXAMPLES:
        report.add(1, "the file holds no training examples")
    return report


def _check_line(raw: str) -> str | None:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"is not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return 'must be a JSON object like {"messages": [...]}'
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return 'needs a non-empty "messages" list'
    for index, message in enumerate(messages):
        problem = _check_message(index, message)
        if problem:
            return problem
    if not any(m["role"] == "assistant" for m in messages):
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
        return f"{where}.content must be a string"
    if not content.strip():
        return f"{where}.content is empty"
    weight = message.get("weight", 1)
    if weight not in (0, 1):
        return f"{where}.weight must be 0 or 1"
    return None
