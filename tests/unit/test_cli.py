"""Every `tunequeue` command: its help, its exit codes (0 done, 1 refused, 2 usage) and the messages a newcomer
reads, on the embedded defaults (SQLite under a temporary data folder)."""

import argparse
import socket

import pytest

from tunequeue import __version__
from tunequeue.cli import HANDLERS, build_parser, main

COMMANDS = sorted(HANDLERS)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty data folder: no schema, no key, no model."""
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path / "data"))
    for key in ("TUNEQUEUE_DATABASE_URL", "TUNEQUEUE_BROKER_URL", "TUNEQUEUE_STORAGE_URL"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


@pytest.fixture
def migrated(fresh):
    assert main(["db", "upgrade"]) == 0
    return fresh


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse: --help, --version and usage errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    assert run(capsys, "--version") == (0, f"tunequeue {__version__}\n", "")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_says_its_exit_codes(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: tunequeue {command}")
    assert "Exit codes: 0 done, 1 refused" in " ".join(out.split())


def parsers(parser=None):
    parser = parser or build_parser()
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from parsers(child)


def test_every_argument_has_help_and_every_default_is_shown():
    for parser in parsers():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction | argparse._VersionAction):
                continue
            assert action.help, f"{parser.prog} {action.dest}: no help text"
        text = parser.format_help()
        for action in parser._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()), f"{parser.prog} {action.dest}"


@pytest.mark.parametrize("argv", [(), ("nope",), ("keys",), ("keys", "revoke"), ("demo", "--port", "x")])
def test_usage_errors_exit_2_with_the_command_named(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "usage: tunequeue" in err and "error:" in err


@pytest.mark.parametrize(
    "argv", [("keys", "list"), ("keys", "create", "--tenant", "a"), ("models", "list"), ("sweep",), ("serve",)]
)
def test_commands_that_need_the_schema_say_to_migrate(fresh, capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith(f"tunequeue {' '.join(argv[:2]) if argv[0] in ('keys', 'models') else argv[0]}: error:")
    assert "has no tunequeue tables yet: run `tunequeue db upgrade`" in err
    assert "Traceback" not in err


def test_db_commands_report_in_one_line(fresh, capsys):
    code, out, err = run(capsys, "db", "current")
    assert code == 0 and "no tunequeue schema" in out and "tunequeue db upgrade" in out
    code, out, err = run(capsys, "db", "upgrade")
    assert code == 0 and len(out.splitlines()) == 1 and "migrated from base (empty) to" in out
    assert "INFO" not in out + err and "Revision ID" not in out + err
    code, out, _ = run(capsys, "db", "upgrade")
    assert code == 0 and "already at" in out
    code, out, _ = run(capsys, "db", "current")
    assert code == 0 and "(the newest)" in out


def test_unreachable_database_is_named_with_its_password_hidden(fresh, capsys, monkeypatch):
    monkeypatch.setenv("TUNEQUEUE_DATABASE_URL", "postgresql+psycopg://user:s3cret@127.0.0.1:1/tunequeue")
    code, out, err = run(capsys, "keys", "list")
    assert code == 1 and "cannot reach the database postgresql+psycopg://user:***@127.0.0.1:1/tunequeue" in err
    assert "s3cret" not in err and "TUNEQUEUE_DATABASE_URL" in err


def test_keys_create_list_revoke(migrated, capsys):
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and out.startswith("No API keys.")
    code, out, err = run(capsys, "keys", "create", "--tenant", "acme", "--name", "ci")
    secret = out.strip()
    assert code == 0 and secret.startswith("tq-") and len(out.splitlines()) == 1 and "not shown again" in err
    code, out, _ = run(capsys, "keys", "list")
    header, row = out.splitlines()
    assert header.split() == ["ID", "TENANT", "ROLE", "PREFIX", "NAME", "CREATED", "(UTC)", "EXPIRES", "(UTC)", "STATE"]
    key_id = row.split()[0]
    assert row.split()[1:5] == ["acme", "tenant", f"{secret[: len(row.split()[3]) - 1]}…", "ci"]
    assert row.split()[-1] == "active" and secret not in out
    assert run(capsys, "keys", "list", "--tenant", "other")[1].startswith("No API keys for tenant 'other'.")
    code, out, _ = run(capsys, "keys", "revoke", key_id)
    assert code == 0 and out.startswith(f"Revoked {key_id}")
    code, out, _ = run(capsys, "keys", "revoke", key_id)
    assert code == 0 and "was already revoked, at" in out
    code, _, err = run(capsys, "keys", "revoke", "key-nope")
    assert code == 1 and err == "tunequeue keys revoke: error: No such API key: 'key-nope'\n"


def test_models_list_and_refused_imports(migrated, capsys, tiny_model, tmp_path):
    import shutil

    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "No base models imported" in out and "import-demo" in out
    code, _, err = run(capsys, "models", "import-gguf", str(tmp_path / "missing.gguf"), "--name", "x")
    assert code == 1 and "no such GGUF file" in err
    no_tokenizer = shutil.copytree(tiny_model, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    code, _, err = run(capsys, "models", "import-hf", str(no_tokenizer), "--name", "x")
    assert code == 1 and "has no tokenizer.json" in err
    code, out, _ = run(capsys, "models", "import-hf", str(tiny_model), "--name", "tiny")
    assert code == 0 and out.startswith("Imported tiny: LlamaForCausalLM")
    code, out, _ = run(capsys, "models", "list")
    assert out.splitlines()[0].split() == ["ID", "ARCHITECTURE", "PARAMETERS", "SOURCE"]
    assert out.splitlines()[1].split()[:2] == ["tiny", "LlamaForCausalLM"]


def test_worker_refuses_zero_slots(capsys):
    code, _, err = run(capsys, "worker", "--cpu-slots", "0")
    assert code == 1 and "--cpu-slots must be at least 1" in err


def test_sweep_on_a_migrated_database(migrated, capsys):
    code, out, _ = run(capsys, "sweep")
    assert code == 0 and "requeued: -" in out and "republished:" in out


def test_demo_refuses_a_port_in_use(fresh, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "demo", "--port", str(port))
    assert code == 1 and f"port {port} is already in use" in err and "--port" in err
