"""The tests' loopback guard (tests/netguard): a Python process started by a test imports it, may use loopback
and Unix sockets, and has every other connection, datagram and name lookup refused before it is made, and
logged; a test during which that happens fails."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netguard import sitecustomize as netguard
from tests.support import ROOT

# Run in a child. Before anything is tried beyond loopback, the real socket calls behind the guard are swapped
# for tripwires: whatever the guard lets through trips one instead of leaving the machine.
CHILD = r"""
import json, os, socket, sys, tempfile
import sitecustomize as guard

if not guard.installed():
    print(json.dumps({"guard": guard.__file__, "installed": False}))
    sys.exit(0)
allowed = {}
with socket.create_server(("127.0.0.1", 0)) as server:
    socket.create_connection(server.getsockname(), timeout=5).close()
    allowed["127.0.0.1"] = True
    socket.create_connection(("localhost", server.getsockname()[1]), timeout=5).close()
    allowed["localhost"] = True
if socket.has_ipv6:
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:  # no IPv6 loopback on this machine
        pass
    else:
        socket.create_connection(server.getsockname()[:2], timeout=5).close()
        allowed["::1"] = True
path = os.path.join(tempfile.mkdtemp(), "s")
with socket.socket(socket.AF_UNIX) as server:
    server.bind(path)
    server.listen()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
    allowed["unix"] = True

def tripwire(name, real):
    def trip(*args, **kwargs):
        if name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex") and guard._ip(args[0]) is not None:
            return real(*args, **kwargs)  # an address literal: parsed, never looked up
        raise RuntimeError(f"TRIPWIRE: {name}{args} got through")
    return trip
guard.REAL.update({name: tripwire(name, real) for name, real in guard.REAL.items()})

own = socket.gethostname()  # answered as loopback, without a resolver (so no tripwire)
local = {
    "getfqdn": socket.getfqdn(),
    "gethostbyname": socket.gethostbyname(own),
    "getaddrinfo": sorted({info[4][0] for info in socket.getaddrinfo(own, 80)}),
}

import httpx
attempts = {
    "tcp": lambda: socket.create_connection(("192.0.2.1", 80), timeout=2),
    "connect_ex": lambda: socket.socket().connect_ex(("192.0.2.1", 443)),
    "udp": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("192.0.2.1", 53)),
    "ipv6": lambda: socket.socket(socket.AF_INET6).connect(("2001:db8::1", 80)),
    "name": lambda: socket.getaddrinfo("guard-check.invalid", 443),
    "gethostbyname": lambda: socket.gethostbyname("guard-check.invalid"),
    "httpx": lambda: httpx.get("https://guard-check.invalid/", timeout=2),
}
refused = {}
for name, attempt in attempts.items():
    try:
        refused[name] = f"not refused: {attempt()!r}"
    except Exception as exc:
        refused[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"guard": guard.__file__, "installed": True, "allowed": allowed, "local": local, "refused": refused}))
"""


def run_child(code: str, log: Path) -> dict:
    env = {**os.environ, netguard.LOG_ENV: str(log)}  # PYTHONPATH as every child of the tests gets it
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_child_process_reaches_loopback_only(tmp_path):
    log = tmp_path / "network.log"
    report = run_child(CHILD, log)
    assert report["guard"] == netguard.__file__ and report["installed"], report
    assert {"127.0.0.1", "localhost", "unix"} <= set(report["allowed"]), report
    assert report["local"] == {
        "getfqdn": socket.gethostname(),
        "gethostbyname": "127.0.0.1",
        "getaddrinfo": ["127.0.0.1"],
    }, report

    refused = report["refused"]
    assert "TRIPWIRE" not in json.dumps(refused), refused  # nothing reached the real socket calls
    for name in ("tcp", "udp", "ipv6", "name", "gethostbyname", "httpx"):
        assert netguard.MARK in refused[name], (name, refused[name])
    assert refused["tcp"].startswith("ConnectionRefusedError")
    assert refused["name"].startswith("gaierror") and refused["httpx"].startswith("ConnectError")
    assert refused["connect_ex"] == f"not refused: {errno.ECONNREFUSED}"  # connect_ex answers with an error code

    lines = log.read_text().splitlines()
    assert len(lines) == 7, lines
    for line in lines:
        assert line.startswith("pid ") and "refused; from " in line and "<string>:" in line, line
    for target in ("('192.0.2.1', 80)", "('192.0.2.1', 443)", "('192.0.2.1', 53)", "('2001:db8::1', 80)"):
        assert any(target in line for line in lines), (target, lines)
    assert sum("'guard-check.invalid'" in line for line in lines) == 3, lines
    assert [line.split()[1] for line in lines] == [lines[0].split()[1]] * 7  # all from the child's pid


@pytest.mark.skipif(not os.environ.get("TUNEQUEUE_NETGUARD_SELF_TEST"), reason="run by the test below")
def test_reaches_beyond_loopback(tmp_path):
    """Fails: a process it starts tries 192.0.2.1 (TEST-NET-1, never routed)."""
    code = CHILD.split("import httpx")[0] + "socket.create_connection(('192.0.2.1', 80), timeout=2)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)


def test_a_test_whose_process_reached_beyond_loopback_fails(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_reaches_beyond_loopback"],
        env={**os.environ, "TUNEQUEUE_NETGUARD_SELF_TEST": "1", "TMPDIR": str(tmp_path)},  # its log stays here
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout, result.stdout
    assert "network access outside loopback was attempted (and refused)" in result.stdout
    assert "connect ('192.0.2.1', 80) refused; from " in result.stdout, result.stdout  # with the child's stack


@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("0", "0")])
def test_a_worker_process_stays_off_the_model_hub_unless_its_operator_says_otherwise(given, seen):
    """bitsandbytes asks the Hugging Face Hub for a CPU kernel when imported on an AVX512-BF16 CPU: every worker
    process is offline by default (the guard above fails any test whose process tried)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | ({"HF_HUB_OFFLINE": given} if given else {})
    shown = "import os, worker; print(os.environ['HF_HUB_OFFLINE'])"
    result = subprocess.run([sys.executable, "-c", shown], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == seen, result.stderr
