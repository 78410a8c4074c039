"""Loopback-only networking for the test suite, in the pytest process and in every Python process it starts.

The test session puts this folder first on PYTHONPATH, so every Python child (the API, Celery workers, recipes
and torchrun ranks, moto's server, `python -c` helpers) imports this file at start-up as `sitecustomize`;
conftest installs it in the pytest process itself. A connection, datagram or name lookup for anything but
127.0.0.0/8, ::1 or `localhost` is refused before the real call is made, so no packet and no DNS query leaves
the machine: the caller gets ConnectionRefusedError (socket.gaierror for a lookup), and one line naming the
process, the address and the calling code is appended to the file named by TUNEQUEUE_TEST_NETWORK_LOG.
conftest reads that file after every test and fails the test that caused a line.

Unix sockets are not touched. What it cannot see: connections opened by C code without Python's socket
module — libpq under psycopg, torch.distributed's TCPStore and gloo, anything built on libuv. The tests give
those clients loopback addresses themselves (Postgres on 127.0.0.1, `--master_addr 127.0.0.1`).
"""

import errno
import importlib.machinery
import importlib.util
import ipaddress
import os
import socket
import sys
import traceback

LOG_ENV = "TUNEQUEUE_TEST_NETWORK_LOG"
MARK = "refused by the tests' loopback guard"
LOOPBACK_NAMES = {"localhost", "localhost."}  # resolved from /etc/hosts; other names could reach DNS
INET = (socket.AF_INET, socket.AF_INET6)
STDLIB = os.path.dirname(os.__file__)
# The machine's own name is answered as loopback without asking a resolver, as /etc/hosts usually answers it:
# torchrun (socket.getfqdn) and DeepSpeed look it up, and on a machine whose hosts file lacks it the real
# lookup would be a DNS query.
HOSTNAME = socket.gethostname().lower()

# The real calls, looked up at call time. Kept on the socket module, so that this file imported twice (as
# `sitecustomize` and as `tests.netguard.sitecustomize` in a pytest started by a test) guards once.
REAL: dict = socket.__dict__.setdefault("_tunequeue_netguard_real", {})


def _ip(host) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]) if isinstance(host, str) else None
    except ValueError:
        return None


def is_loopback(host) -> bool:
    """A host whose use cannot leave the machine: a loopback literal or `localhost`; None is the local wildcard."""
    if host is None or (isinstance(host, str) and host.lower() in LOOPBACK_NAMES):
        return True
    address = _ip(host)
    if address is None:
        return False  # a name: resolving it may query DNS, so it is refused before any lookup
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _host(address):
    return address[0] if isinstance(address, tuple) and address else address


def _where() -> str:
    """The innermost calls, then the innermost ones of the code that made them (not a library's), innermost first."""
    frames = [f for f in traceback.extract_stack() if f.filename != __file__]
    inner, outer = frames[-4:], frames[:-4]
    own = [f for f in outer if not _in_library(f.filename)][-4:]
    text = " < ".join(_frame(f) for f in reversed(inner))
    return text + (" … " + " < ".join(_frame(f) for f in reversed(own)) if own else "")


def _in_library(path: str) -> bool:
    return "site-packages/" in path or path.startswith((STDLIB, "<frozen"))


def _frame(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif path.startswith(STDLIB):
        path = os.path.relpath(path, STDLIB)
    return f"{path}:{frame.lineno} {frame.name}"


def _report(action: str, target) -> str:
    message = f"{action} {target!r} {MARK}: tests may only reach 127.0.0.0/8 and ::1"
    path = os.environ.get(LOG_ENV)
    if path:
        command = " ".join(sys.argv)[:160]
        line = f"pid {os.getpid()} [{command}] {action} {target!r} refused; from {_where()}"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line[:2000].replace("\n", " ") + "\n").encode())  # one write: lines never interleave
        finally:
            os.close(fd)
    return message


def _connect(self, address):
    if self.family in INET and not is_loopback(_host(address)):
        raise ConnectionRefusedError(errno.ECONNREFUSED, _report("connect", address))
    return REAL["connect"](self, address)


def _connect_ex(self, address):
    if self.family in INET and not is_loopback(_host(address)):
        _report("connect", address)
        return errno.ECONNREFUSED
    return REAL["connect_ex"](self, address)


def _sendto(self, data, *flags_and_address):
    address = flags_and_address[-1] if flags_and_address else None
    if self.family in INET and not is_loopback(_host(address)):
        raise ConnectionRefusedError(errno.ECONNREFUSED, _report("sendto", address))
    return REAL["sendto"](self, data, *flags_and_address)


def _sendmsg(self, buffers, *args):
    address = args[2] if len(args) > 2 else None  # sendmsg(buffers, ancdata, flags, address)
    if address is not None and self.family in INET and not is_loopback(_host(address)):
        raise ConnectionRefusedError(errno.ECONNREFUSED, _report("sendmsg", address))
    return REAL["sendmsg"](self, buffers, *args)


def _own_name(host) -> bool:
    return isinstance(host, str) and host.lower().rstrip(".") == HOSTNAME


def _getaddrinfo(host, port, *args, **kwargs):
    if _own_name(host):
        family = kwargs.get("family", args[0] if args else 0)
        return REAL["getaddrinfo"]("::1" if family == socket.AF_INET6 else "127.0.0.1", port, *args, **kwargs)
    if not (is_loopback(host) or _ip(host) is not None):  # an address literal is parsed, not looked up
        raise socket.gaierror(socket.EAI_NONAME, _report("getaddrinfo", host))
    return REAL["getaddrinfo"](host, port, *args, **kwargs)


def _gethostbyname(host):
    if not (is_loopback(host) or _own_name(host) or _ip(host) is not None):
        raise socket.gaierror(socket.EAI_NONAME, _report("gethostbyname", host))
    return REAL["gethostbyname"]("127.0.0.1" if _own_name(host) else host)


def _gethostbyname_ex(host):
    if _own_name(host):
        return host, [], ["127.0.0.1"]
    if not (is_loopback(host) or _ip(host) is not None):
        raise socket.gaierror(socket.EAI_NONAME, _report("gethostbyname_ex", host))
    return REAL["gethostbyname_ex"](host)


def _reverse_lookup(host):
    """A reverse lookup of any address but loopback asks DNS."""
    if _own_name(host):
        return host, [], ["127.0.0.1"]
    if not is_loopback(host):
        raise socket.herror(1, _report("gethostbyaddr", host))  # 1: HOST_NOT_FOUND, as the real call says
    return REAL["gethostbyaddr"](host)


def _getnameinfo(sockaddr, flags):
    if not flags & socket.NI_NUMERICHOST and not is_loopback(_host(sockaddr)):
        raise socket.gaierror(socket.EAI_NONAME, _report("getnameinfo", sockaddr))
    return REAL["getnameinfo"](sockaddr, flags)


def installed() -> bool:
    return bool(REAL)


def install() -> None:
    """Guard this process; each refusal is logged to the file named by $TUNEQUEUE_TEST_NETWORK_LOG."""
    if REAL:
        return
    for name, guard in (("connect", _connect), ("connect_ex", _connect_ex), ("sendto", _sendto), ("sendmsg", _sendmsg)):
        REAL[name] = getattr(socket.socket, name)
        setattr(socket.socket, name, guard)
    # socket.create_connection resolves through the module's getaddrinfo, so it is covered too.
    lookups = (
        ("getaddrinfo", _getaddrinfo),
        ("gethostbyname", _gethostbyname),
        ("gethostbyname_ex", _gethostbyname_ex),
        ("gethostbyaddr", _reverse_lookup),
        ("getnameinfo", _getnameinfo),
    )
    for name, guard in lookups:
        REAL[name] = getattr(socket, name)
        setattr(socket, name, guard)


def _run_shadowed_sitecustomize() -> None:
    """This file hides any other sitecustomize on the path (a distribution's, a virtualenv's): run that one too."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if __name__ == "sitecustomize":
    if os.environ.get(LOG_ENV):
        install()
    _run_shadowed_sitecustomize()
