"""How a failed recipe is described: of several ranks' error reports, the one that is the cause; of a crash it
could not report, which rank ended, how, and its last meaningful line."""

import re
import signal

# A rank that fails first reports its exception; the others then fail in a collective it left. The cause is
# the first report that is not such an echo.
COLLECTIVE_ECHOES = ("DistBackendError", "Connection closed by peer", "Connection reset by peer", "NCCL", "Gloo")


def cause(errors: list[dict]) -> dict | None:
    own = [e for e in errors if not any(echo in e.get("message", "") for echo in COLLECTIVE_ECHOES)]
    return (own or errors)[0] if errors else None


ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
ROOT_CAUSE_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
RANK_PREFIX = re.compile(r"^\[default(\d+)\]:")
NOISE = re.compile(r"^[\s=*\-]*$|^[EWI]\d{4} |^Traceback \(most recent call last\):$|Warning\b|warnings\.warn\(")
FATAL = re.compile(r"\b\w*(Error|Exception|Fault|Abort\w*)\b|terminate called|core dumped", re.IGNORECASE)


def describe_crash(returncode: int, stderr_lines: list[str]) -> str:
    """How the recipe ended without reporting why: which rank (torchrun's "Root Cause" block names it), by
    which signal or exit code, and that rank's last meaningful line of stderr (after a signal, only one that
    reads as an error), never a banner or a warning."""
    rank, code = None, returncode
    for line in stderr_lines:
        if match := ROOT_CAUSE_RANK.match(line):
            rank = int(match.group(1))
        elif (match := ROOT_CAUSE_EXIT.match(line)) and rank is not None:
            code = int(match.group(1))
    how = f"was killed by signal {signal_name(-code)}" if code < 0 else f"exited with code {code}"
    last = ""
    for line in reversed(stderr_lines):
        prefix = RANK_PREFIX.match(line)
        if rank is not None and (prefix is None or int(prefix.group(1)) != rank):
            continue
        text = line[prefix.end() :] if prefix else line
        if not NOISE.search(text):
            last = text.strip() if code > 0 or FATAL.search(text) else ""
            break
    head = f"(rank {rank}) {how}" if rank is not None else how
    return head + (f": {last}" if last else "")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
