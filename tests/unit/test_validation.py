import json

from shared.datasets.validation import validate_chat_jsonl


def lines(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_valid_file_counts_examples():
    report = validate_chat_jsonl(lines(GOOD, GOOD, "", GOOD))
    assert report.ok and report.examples == 3


def test_errors_name_the_line():
    report = validate_chat_jsonl(lines(GOOD, "{not json", GOOD, {"messages": [{"role": "bot", "content": "x"}]}))
    assert not report.ok
    assert [e.line for e in report.errors] == [2, 4]
    assert "not valid JSON" in report.errors[0].message
    assert "role must be one of" in report.errors[1].message
    assert "line 2" in report.summary() and "line 4" in report.summary()


def test_no_assistant_empty_content_and_bad_weight():
    report = validate_chat_jsonl(
        lines(
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
            [1, 2, 3],
        )
    )
    assert [e.line for e in report.errors] == [1, 2, 3, 4]
    assert "no assistant" in report.errors[0].message
    assert "empty" in report.errors[1].message
    assert "weight" in report.errors[2].message
    assert "JSON object" in report.errors[3].message


def test_not_utf8_reports_line():
    report = validate_chat_jsonl(lines(GOOD) + b'{"messages": "\xff\xfe"}\n')
    assert not report.ok and report.errors[0].line == 2 and "UTF-8" in report.errors[0].message


def test_error_list_is_capped_but_counted():
    report = validate_chat_jsonl(lines(*["nope"] * 50))
    assert report.error_count == 50 and len(report.errors) == 20
    assert "and 45 more" in report.summary()


def test_empty_file_is_refused():
    assert not validate_chat_jsonl(b"\n\n").ok
