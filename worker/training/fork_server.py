"""The worker's fork server (`python -m worker.training --fork-server`): one process per worker that imports the
recipe's libraries once, without touching CUDA, then forks each ready recipe process (`worker.training.ready`)
from itself in a few milliseconds instead of starting an interpreter that imports them again (seconds of CPU
per job). A forked process is what a started one is: its own session, stdin, stdout and stderr (pipes of the
worker's, passed over the control socket), the job's environment, one job, and an exit code; it dies with the
fork server, which dies with the worker (PDEATHSIG), so a lost worker leaves no training behind.

The worker's evaluations and exports (`python -m worker.training.evaluate_job`, `… .export`) are forked the same
way: the request names the module and its arguments, and the child runs it as `python -m` would.

The control socket (a SOCK_SEQPACKET pair, one JSON object per message) carries, worker to server, {"env": {…}}
(and, for a module, "module" and "args") with three file descriptors (the child's stdin, stdout, stderr); server
to worker, {"loaded_seconds": s} once,
then {"pid": p} for each fork in order and {"exit": p, "returncode": c} when one ends (a signal: minus its
number, as `subprocess` reports it). When the worker closes its end the server forks no more, waits for its
processes (jobs still training) and exits."""

import json
import os
import runpy
import select
import socket
import sys
import time
import traceback

from worker.training.process import (
    FORK_SERVER_SOCKET_ENV,
    FORKED_ENV,
    PARENT_PID_ENV,
    READY_FLAG,
    die_when_parent_dies,
)

POLL_SECONDS = 0.05  # how often the server looks for ended processes while it waits for a request


def main() -> int:
    sock = socket.socket(fileno=int(os.environ.pop(FORK_SERVER_SOCKET_ENV)))
    started = time.monotonic()
    from worker.training.ready import import_recipe

    import_recipe()  # raises if CUDA was initialised: a forked process must be free to choose its devices
    loaded = round(time.monotonic() - started, 2)
    send(sock, {"loaded_seconds": loaded})
    return serve(sock, loaded)


def serve(sock: socket.socket, loaded: float) -> int:
    children: set[int] = set()
    open_ = True
    while open_ or children:
        reap(sock, children)
        if not open_:
            time.sleep(POLL_SECONDS)
            continue
        if not select.select([sock], [], [], POLL_SECONDS)[0]:
            continue
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
        except OSError:
            open_ = False
            continue
        if not message:  # the worker closed its end
            open_ = False
            continue
        request = json.loads(message)
        env, module = request["env"], (request.get("module"), request.get("args", []))
        settled, settling = os.pipe()  # closed by the child once it leads its own session
        pid = os.fork()
        if pid == 0:
            os.close(settled)
            become_ready_process(sock, fds, env, loaded, settling, module)
        os.close(settling)
        os.read(settled, 1)  # the worker may signal its process group as soon as it has the pid
        os.close(settled)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        send(sock, {"pid": pid})
    return 0


def reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        send(sock, {"exit": pid, "returncode": os.waitstatus_to_exitcode(status)})


def send(sock: socket.socket, message: dict) -> None:
    try:
        sock.sendall(json.dumps(message).encode())
    except OSError:  # the worker is gone: its end of the socket with it
        pass


def become_ready_process(
    sock: socket.socket,
    fds: list[int],
    env: dict[str, str],
    loaded: float,
    settling: int,
    module: tuple[str | None, list[str]] = (None, []),
) -> None:
    """In the forked child: the ready process's own session, pipes and environment, then `--ready`'s main, or
    the requested module as `python -m module args…` runs it. Never returns."""
    code = 1
    try:
        server = os.getppid()
        sock.close()
        os.setsid()
        os.close(settling)
        die_when_parent_dies()
        if os.getppid() != server:  # the server died between the fork and the prctl
            os._exit(1)
        for fd, target in zip(fds, (0, 1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        os.environ.update(env)
        os.environ[PARENT_PID_ENV] = str(server)  # it dies with the server, which dies with the worker
        os.environ[FORKED_ENV] = str(loaded)
        from worker.training.ready import retitle

        name, args = module
        if name is not None:
            retitle([sys.orig_argv[0], "-m", name, *args])
            sys.argv = [name, *args]
            runpy.run_module(name, run_name="__main__", alter_sys=True)
            code = 0
        else:
            from worker.training.__main__ import main as recipe_main

            retitle([sys.orig_argv[0], "-m", "worker.training", READY_FLAG])
            code = recipe_main([READY_FLAG])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
