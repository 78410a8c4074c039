"""Structural validation of uploads: every bad input the issue lists gets a message with its line."""

import json

import pytest

from shared.datasets.validation import CHAT, PROMPT_COMPLETION, TEXT, validate_jsonl


def lines(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def conversation(*turns, **extra):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)], **extra}


GOOD = conversation("hi", "hello")


def only_error(data: bytes, **kwargs):
    report = validate_jsonl(data, **kwargs)
    assert not report.ok and report.errors, report
    return report.errors[0]


@pytest.mark.parametrize(
    "records, kind",
    [
        ([GOOD] * 3, CHAT),
        ([{"prompt": "a", "completion": "b"}] * 3, PROMPT_COMPLETION),
        ([{"text": "a"}] * 3, TEXT),
    ],
)
def test_formats_are_detected(records, kind):
    report = validate_jsonl(lines(*records))
    assert report.ok and report.format == kind and report.examples == 3


def test_mixed_formats_name_the_first_offending_line():
    error = only_error(lines(GOOD, GOOD, {"text": "x"}, {"prompt": "p", "completion": "c"}))
    assert error.line == 3 and "text format" in error.message and "chat format" in error.message


def test_invalid_utf8():
    error = only_error(lines(GOOD) + b'{"text": "\xff\xfe"}\n')
    assert error.line == 2 and "UTF-8" in error.message


def test_bom_and_crlf_are_accepted_with_warnings():
    report = validate_jsonl(b"\xef\xbb\xbf" + lines(GOOD, GOOD).replace(b"\n", b"\r\n"))
    assert report.ok and report.examples == 2
    assert any("byte order mark" in w.message for w in report.warnings)
    assert any("CRLF" in w.message for w in report.warnings)


def test_empty_file():
    assert "no examples" in only_error(b"").message
    assert "no examples" in only_error(b"\n\n").message


def test_blank_line_is_skipped_with_a_warning():
    report = validate_jsonl(lines(GOOD, "", GOOD))
    assert report.ok and report.examples == 2 and [w.line for w in report.warnings] == [2]


def test_line_that_is_not_an_object():
    error = only_error(lines(GOOD, [1, 2, 3]))
    assert error.line == 2 and "JSON object" in error.message


def test_deep_nesting():
    error = only_error(lines(GOOD) + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert error.line == 2 and ("nested too deeply" in error.message or "limit" in error.message)


def test_ten_megabyte_line():
    error = only_error(lines(GOOD) + json.dumps({"text": "x" * 10_000_000}).encode() + b"\n")
    assert error.line == 2 and "byte limit" in error.message


def test_wrong_role():
    error = only_error(lines({"messages": [{"role": "bot", "content": "x"}]}))
    assert error.line == 1 and "role must be one of" in error.message


def test_two_user_turns_in_a_row():
    bad = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    }
    error = only_error(lines(GOOD, bad))
    assert error.line == 2 and "two user messages in a row" in error.message


def test_no_assistant_turn():
    error = only_error(lines({"messages": [{"role": "user", "content": "only a question"}]}))
    assert "no assistant message" in error.message


def test_non_string_content():
    error = only_error(lines({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": 5}]}))
    assert "content must be a string" in error.message


def test_empty_content_and_bad_weight():
    assert "empty" in only_error(lines(conversation("q", "  "))).message
    bad_weight = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}
    assert "weight" in only_error(lines(bad_weight)).message


def test_unknown_keys_are_warnings_not_errors():
    report = validate_jsonl(lines(conversation("q", "a", id=7)))
    assert report.ok and "unknown key(s) ignored: id" in report.warnings[0].message


def test_fewer_than_minimum_examples():
    error = only_error(lines(GOOD, GOOD), min_examples=10)
    assert "2 examples; at least 10" in error.message


def test_error_list_is_capped_but_counted():
    report = validate_jsonl(lines(*["nope"] * 50))
    assert report.error_count == 50 and len(report.errors) == 20
    assert "and 45 more" in report.summary()
