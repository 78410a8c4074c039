"""`tunequeue files` and `tunequeue jobs`: where the URL and key come from, what a user reads when the server
refuses or is not there, and the live watch and the download, against a small scripted HTTP server on loopback
(the integration test drives them against the real stack)."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support import ROOT, free_port
from tunequeue.cli import build_parser, main
from tunequeue.commands.client import ApiError, Client, ClientError, resolve_connection
from tunequeue.commands.jobs import job_body

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


# A scripted server: routes map (method, path) to a function of the request giving (status, headers, body).

Route = Callable[["Request"], tuple[int, dict[str, str], bytes]]


class Request:
    def __init__(self, handler: BaseHTTPRequestHandler):
        url = urlsplit(handler.path)
        self.method, self.path = handler.command, url.path
        self.query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.headers = handler.headers
        length = int(handler.headers.get("content-length") or 0)
        self.body = handler.rfile.read(length) if length else b""


class ScriptedServer:
    def __init__(self):
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self):
                request = Request(self)
                server.requests.append(request)
                route = server.routes.get((request.method, request.path))
                status, headers, body = route(request) if route else reply(404, error("Not Found", "not_found"))
                self.send_response(status)
                for name, value in {"content-length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = handle_one

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def reply(status: int, value, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"content-type": "application/json", **(headers or {})}, json.dumps(value).encode()


def error(message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.close()


def run(capsys, server: ScriptedServer, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--url", server.url, "--api-key", "tq-test"])
    out, err = capsys.readouterr()
    return code, out, err


# Where the URL and the key come from


@pytest.fixture
def config(tmp_path):
    def write(text: str) -> dict[str, str]:
        path = tmp_path / "config.toml"
        path.write_text(text)
        return {"TUNEQUEUE_CONFIG": str(path)}

    return write


def resolved(url, api_key, environ) -> tuple[str, str]:
    connection = resolve_connection(url, api_key, environ)
    return connection.url, connection.api_key


def test_a_flag_wins_over_the_environment_which_wins_over_the_config_file(config):
    file = config('url = "http://127.0.0.1:1001"\napi_key = "tq-file"\n')
    env = {**file, "TUNEQUEUE_URL": "http://127.0.0.1:1002", "TUNEQUEUE_API_KEY": "tq-env"}
    assert resolved("http://127.0.0.1:1003", "tq-flag", env) == ("http://127.0.0.1:1003", "tq-flag")
    assert resolved(None, None, env) == ("http://127.0.0.1:1002", "tq-env")
    assert resolved(None, None, file) == ("http://127.0.0.1:1001", "tq-file")
    assert resolved(None, "tq-flag", {**file, "TUNEQUEUE_URL": "http://127.0.0.1:1002"}) == (
        "http://127.0.0.1:1002",
        "tq-flag",
    )
    assert resolved("http://127.0.0.1:1003", None, file) == ("http://127.0.0.1:1003", "tq-file")


def test_the_url_defaults_to_the_local_server_and_takes_the_sdks_base_url(config):
    assert resolve_connection(None, "tq-x", config("")).url == "http://127.0.0.1:8000"
    assert resolve_connection("http://127.0.0.1:1005/v1/", "tq-x", {}).url == "http://127.0.0.1:1005"
    with pytest.raises(ClientError, match="'localhost:8000' is not an http:// or https:// URL"):
        resolve_connection("localhost:8000", "tq-x", {})


def test_the_default_config_file_is_in_the_users_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".config" / "tunequeue"
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text('api_key = "tq-home"\n')
    connection = resolve_connection(None, None, {})
    assert connection.api_key == "tq-home" and connection.key_source == str(folder / "config.toml")


def test_a_missing_key_names_the_flag_the_variable_and_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("TUNEQUEUE_API_KEY", "TUNEQUEUE_URL", "TUNEQUEUE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert main(["jobs", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tunequeue jobs list: error: no API key: pass --api-key, set TUNEQUEUE_API_KEY, or put")
    assert str(tmp_path / ".config" / "tunequeue" / "config.toml") in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("url = ", "is not valid TOML"),
        ('apikey = "tq-x"', "unknown keys ['apikey']; it takes ['url', 'api_key']"),
        ("api_key = 7", "api_key must be a string"),
    ],
)
def test_a_broken_config_file_is_refused_naming_it(config, text, message):
    env = config(text)
    with pytest.raises(ClientError, match=re.escape(message)) as refused:
        resolve_connection(None, None, env)
    assert env["TUNEQUEUE_CONFIG"] in str(refused.value)
    assert (
        resolve_connection("http://127.0.0.1:1004", "tq-x", env).url == "http://127.0.0.1:1004"
    )  # not read when nothing is missing


def test_a_config_file_named_in_the_environment_must_exist(tmp_path):
    with pytest.raises(ClientError, match="TUNEQUEUE_CONFIG names .*nope.toml, which is not a file"):
        resolve_connection(None, None, {"TUNEQUEUE_CONFIG": str(tmp_path / "nope.toml")})


# What the server says


def test_the_servers_own_error_message_is_shown_with_exit_1(server, capsys):
    server.routes["GET", "/v1/fine_tuning/jobs/ftjob-1"] = lambda r: reply(404, error("No such job", "job_not_found"))
    server.routes["POST", "/v1/fine_tuning/jobs/ftjob-1/cancel"] = lambda r: reply(409, error("Job is succeeded"))
    assert run(capsys, server, "jobs", "get", "ftjob-1") == (
        1,
        "",
        "tunequeue jobs get: error: No such job (HTTP 404, job_not_found)\n",
    )
    assert (
        run(capsys, server, "jobs", "cancel", "ftjob-1")[2]
        == "tunequeue jobs cancel: error: Job is succeeded (HTTP 409)\n"
    )
    assert server.requests[0].headers["authorization"] == "Bearer tq-test"


def test_an_answer_not_in_openais_shape_is_shown_by_its_start(server):
    server.routes["GET", "/proxy"] = lambda r: (
        502,
        {"content-type": "text/html"},
        b"<html> <b>Bad</b>\n gateway</html>",
    )
    server.routes["GET", "/detail"] = lambda r: reply(404, {"detail": "Not Found"})
    with Client(resolve_connection(server.url, "tq-x", {})) as client:
        with pytest.raises(ApiError) as proxy:
            client.get("/proxy")
        with pytest.raises(ApiError) as detail:
            client.get("/detail")
    assert str(proxy.value) == f"Bad Gateway from {server.url}/proxy: <html> <b>Bad</b> gateway</html> (HTTP 502)"
    assert str(detail.value) == "Not Found (HTTP 404)"


def test_a_refused_key_says_where_the_key_came_from(server, monkeypatch, capsys):
    server.routes["GET", "/v1/fine_tuning/jobs"] = lambda r: reply(401, error("Incorrect API key", "invalid_api_key"))
    monkeypatch.setenv("TUNEQUEUE_API_KEY", "tq-old")
    assert main(["jobs", "list", "--url", server.url]) == 1
    message = "Incorrect API key; the key came from TUNEQUEUE_API_KEY (HTTP 401, invalid_api_key)"
    assert capsys.readouterr().err == f"tunequeue jobs list: error: {message}\n"


def test_a_server_that_is_not_there_is_named(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["jobs", "get", "ftjob-1", "--url", url, "--api-key", "tq-x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tunequeue jobs get: error: cannot reach a tunequeue server at {url} (")
    assert "--url / TUNEQUEUE_URL" in err


# Requests


def test_a_job_is_created_with_openais_body():
    args = build_parser().parse_args(
        "jobs create --model m --training-file file-1 --epochs 2 --batch-size 4 --learning-rate-multiplier 0.5 "
        "--seed 7 --suffix s --metadata team=ml run=a=b --metadata x= --dry-run".split()
    )
    assert job_body(args) == {
        "model": "m",
        "training_file": "file-1",
        "suffix": "s",
        "seed": 7,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}},
        },
        "metadata": {"team": "ml", "run": "a=b", "x": ""},
        "dry_run": True,
    }
    plain = build_parser().parse_args("jobs create --model m --training-file file-1".split())
    assert job_body(plain) == {"model": "m", "training_file": "file-1"}  # the server resolves "auto"


def test_an_upload_sends_the_file_and_prints_its_id(server, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"text": "hello"}\n' * 5000)
    uploaded = {"id": "file-1", "object": "file", "bytes": 90000, "filename": "train.jsonl", "validation": None}
    server.routes["POST", "/v1/files"] = lambda r: reply(200, uploaded)
    code, out, err = run(capsys, server, "files", "upload", str(data))
    assert (code, out) == (0, "file-1\n") and "Uploaded train.jsonl as file-1" in err
    body = server.requests[-1].body
    assert data.read_bytes() in body and b'name="purpose"\r\n\r\nfine-tune' in body
    assert run(capsys, server, "files", "upload", str(tmp_path / "missing.jsonl"))[2].endswith(
        "no such file: " + str(tmp_path / "missing.jsonl") + "\n"
    )


def test_a_status_filter_is_sent_to_the_server(server, capsys):
    jobs = [{"id": f"ftjob-{i}", "status": "failed" if i % 3 == 0 else "succeeded"} for i in range(250)]

    def listing(request):
        chosen = [job for job in jobs if job["status"] == request.query.get("status", job["status"])]
        limit = int(request.query["limit"])
        return reply(200, {"object": "list", "data": chosen[:limit], "has_more": len(chosen) > limit})

    server.routes["GET", "/v1/fine_tuning/jobs"] = listing
    code, out, _ = run(capsys, server, "jobs", "list", "--status", "failed", "--limit", "40", "--json")
    page = json.loads(out)
    assert code == 0 and [job["id"] for job in page["data"]] == [f"ftjob-{i}" for i in range(0, 120, 3)]
    assert page["has_more"] is True and len(server.requests) == 1


# watch


class ScriptedJob:
    """A job that takes one scripted step each time it is read; its events, newest first, paged with `after`."""

    def __init__(self, server: ScriptedServer, steps: list[dict]):
        self.steps, self.read, self.events = steps, 0, []
        self.job = {"id": "ftjob-1", "status": "validating_files", "progress": None, "error": None}
        server.routes["GET", "/v1/fine_tuning/jobs/ftjob-1"] = self.get
        server.routes["GET", "/v1/fine_tuning/jobs/ftjob-1/events"] = self.list_events

    def get(self, request):
        step = self.steps[min(self.read, len(self.steps) - 1)]
        self.read += 1
        if "http_status" in step:
            return reply(step["http_status"], error("The database is unavailable"))
        self.job.update(step.get("job", {}))
        for message in step.get("events", []):
            self.add(message)
        return reply(200, self.job)

    def add(self, message: str, data: dict | None = None) -> None:
        number = len(self.events)
        self.events.append({"id": f"ftevent-{number}", "created_at": 1_700_000_000 + number, "level": "info",
                            "message": message, "type": "metrics" if data else "message", "data": data})  # fmt: skip

    def list_events(self, request):
        newest_first = self.events[::-1]
        start = 0
        if "after" in request.query:
            start = next(i + 1 for i, e in enumerate(newest_first) if e["id"] == request.query["after"])
        limit = int(request.query.get("limit", 20))
        page = newest_first[start : start + limit]
        return reply(200, {"object": "list", "data": page, "has_more": start + limit < len(newest_first)})


def metrics(step: int, total: int = 4, **losses) -> dict:
    return {"step": step, "total_steps": total, "train_loss": 2.0 / step, **losses}


def test_watch_prints_every_new_event_once_in_order_and_the_result(server, capsys):
    history = [f"old event {i}" for i in range(15)]
    burst = [f"burst {i}" for i in range(45)]  # more than a page between two polls
    job = ScriptedJob(
        server,
        [
            {"events": history},
            {"job": {"status": "running", "progress": metrics(1)}, "events": ["Fine-tuning job started"]},
            {"job": {"progress": metrics(2, valid_loss=1.5)}, "events": burst},
            {"http_status": 503},
            {"job": {"progress": metrics(3)}},
            {
                "job": {"status": "succeeded", "fine_tuned_model": "ft:m:s:ftjob-1", "progress": metrics(4)},
                "events": ["The job has successfully completed"],
            },
        ],
    )
    code, out, err = run(capsys, server, "jobs", "watch", "ftjob-1", "--interval", "0.01")
    assert code == 0, err
    printed = [line[10:] for line in out.splitlines() if re.match(r"\d\d:\d\d:\d\d  ", line)]
    expected = history[-10:] + ["Fine-tuning job started", *burst, "The job has successfully completed"]
    assert printed == expected  # the last 10 of the history, then every new one, each once
    assert "ftjob-1 succeeded: ft:m:s:ftjob-1" in out and "final train loss 0.5000, valid loss 1.5000" in out
    assert "The database is unavailable (HTTP 503); retrying for up to 60 s" in out
    assert job.read == 6


def test_watch_exits_1_with_the_jobs_error_when_it_fails(server, capsys):
    failure = {"code": "training_error", "message": "CUDA out of memory"}
    ScriptedJob(server, [{"job": {"status": "running"}}, {"job": {"status": "failed", "error": failure}}])
    code, _, err = run(capsys, server, "jobs", "watch", "ftjob-1", "--interval", "0.01")
    assert (code, err) == (1, "tunequeue jobs watch: error: ftjob-1 failed (training_error): CUDA out of memory\n")


def test_watch_json_prints_events_then_the_job_one_a_line(server, capsys):
    ScriptedJob(server, [{"events": ["a"]}, {"job": {"status": "cancelled"}, "events": ["The job was cancelled"]}])
    code, out, err = run(capsys, server, "jobs", "watch", "ftjob-1", "--interval", "0.01", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line.get("message") for line in lines[:-1]] == ["a", "The job was cancelled"]
    assert lines[-1]["status"] == "cancelled" and code == 1 and err.endswith("ftjob-1 was cancelled\n")


def test_ctrl_c_stops_watching_with_exit_130(server):
    ScriptedJob(server, [{"job": {"status": "running", "progress": metrics(1)}, "events": ["started"]}])
    env = {**os.environ, "TUNEQUEUE_URL": server.url, "TUNEQUEUE_API_KEY": "tq-x", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tunequeue", "jobs", "watch", "ftjob-1", "--interval", "0.05"]
    watcher = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "started" in watcher.stdout.readline()  # watching
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 130
    assert "Interrupted: stopped watching; the job is untouched" in err and "Traceback" not in err
    assert not [r for r in server.requests if r.method == "POST"]


# download


def serve_adapter(server: ScriptedServer, content: bytes, sha256: str | None = None) -> None:
    headers = {"content-type": "application/zip", "x-adapter-sha256": sha256 or hashlib.sha256(content).hexdigest()}
    server.routes["GET", "/v1/fine_tuning/jobs/ftjob-1/adapter"] = lambda r: (200, headers, content)


def test_download_writes_the_adapter_and_prints_its_path(server, tmp_path, capsys, monkeypatch):
    content = os.urandom(300_000)
    serve_adapter(server, content)
    monkeypatch.chdir(tmp_path)
    assert run(capsys, server, "jobs", "download", "ftjob-1")[:2] == (0, "ftjob-1-adapter.zip\n")
    assert (tmp_path / "ftjob-1-adapter.zip").read_bytes() == content
    (tmp_path / "out").mkdir()
    assert run(capsys, server, "jobs", "download", "ftjob-1", "-o", "out")[1] == "out/ftjob-1-adapter.zip\n"
    code, out, _ = run(capsys, server, "jobs", "download", "ftjob-1", "-o", "mine.zip", "--json")
    assert json.loads(out) == {"path": "mine.zip", "bytes": 300_000, "sha256": hashlib.sha256(content).hexdigest()}
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "ftjob-1-adapter.zip",
        "ftjob-1-adapter.zip",
        "mine.zip",
        "out",
    ]


def test_a_download_that_does_not_match_the_servers_sha256_writes_nothing(server, tmp_path, capsys):
    serve_adapter(server, b"zip bytes", sha256="0" * 64)
    target = tmp_path / "adapter.zip"
    code, _, err = run(capsys, server, "jobs", "download", "ftjob-1", "-o", str(target))
    assert code == 1 and "not the server's 000" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_export_waits_for_the_export_then_downloads_it(server, tmp_path, capsys, monkeypatch):
    content = os.urandom(200_000)
    fidelity = {"loss_merged": 1.2614, "loss_trained": 1.2609, "loss_drift": 0.0004, "greedy_matches": 3,
                "samples": [{}, {}, {}]}  # fmt: skip
    states = iter([{"status": "running", "progress": "merging: 50/272 tensors"}, {"status": "succeeded"}])
    export = {"id": "ftexport-1", "object": "fine_tuning.job.export", "format": "gguf", "status": "queued"}
    asked: list[dict] = []

    def create(request):
        asked.append(json.loads(request.body))
        return reply(200, export)

    server.routes["POST", "/v1/fine_tuning/jobs/ftjob-1/exports"] = create
    server.routes["GET", "/v1/fine_tuning/jobs/ftjob-1/exports/ftexport-1"] = lambda r: reply(
        200, {**export, "fidelity": fidelity, **next(states)}
    )
    headers = {"content-type": "application/zip", "x-export-sha256": hashlib.sha256(content).hexdigest()}
    server.routes["GET", "/v1/fine_tuning/jobs/ftjob-1/exports/ftexport-1/content"] = lambda r: (200, headers, content)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, server, "jobs", "export", "ftjob-1", "--format", "gguf", "--interval", "0.01")
    assert (code, out) == (0, "ftjob-1-gguf-ftexport-1.zip\n"), err
    assert asked == [{"format": "gguf", "quantization": "q8_0"}]
    assert "ftexport-1: running, merging: 50/272 tensors" in err and "held-out loss 1.2614 against 1.2609" in err
    assert (tmp_path / "ftjob-1-gguf-ftexport-1.zip").read_bytes() == content


def test_an_export_that_fails_says_why_and_writes_nothing(server, tmp_path, capsys):
    failed = {"id": "ftexport-2", "format": "merged", "status": "failed",
              "error": "its fidelity is outside the bounds: loss drift 3.00%"}  # fmt: skip
    server.routes["POST", "/v1/fine_tuning/jobs/ftjob-1/exports"] = lambda r: reply(200, {**failed, "status": "queued"})
    server.routes["GET", "/v1/fine_tuning/jobs/ftjob-1/exports/ftexport-2"] = lambda r: reply(200, failed)
    code, _, err = run(capsys, server, "jobs", "export", "ftjob-1", "-o", str(tmp_path), "--interval", "0.01")
    assert code == 1 and "ftexport-2 failed: its fidelity is outside the bounds" in err
    assert list(tmp_path.iterdir()) == []
