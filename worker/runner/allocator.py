"""The memory allocator of the recipe's processes. PyTorch on a CPU allocates and frees activation-sized
blocks at every step; glibc's malloc keeps much of what is freed (the process's peak grows from step to step),
jemalloc returns it and reuses it. Measured in docs/BENCHMARKS.md: about 0.6x the recipe's peak RSS at the same
speed and the same loss. Preloaded (LD_PRELOAD) into the processes a worker starts, so nothing in the recipe
changes; where the system has no jemalloc, glibc's malloc stays."""

import ctypes.util
import functools
import logging
from pathlib import Path

log = logging.getLogger("tunequeue.worker")
JEMALLOC = "jemalloc"


@functools.cache
def preload(setting: str) -> str | None:
    """The library to preload for `setting` (see `Settings.training_allocator`), or None for glibc's."""
    if setting == "system":
        return None
    if setting == "auto":
        found = ctypes.util.find_library(JEMALLOC)  # a soname, e.g. libjemalloc.so.2, which ld.so finds itself
        if found is None:
            log.info("no jemalloc on this system (Debian/Ubuntu: libjemalloc2): the recipe uses glibc's malloc")
        return found
    return setting  # a path, checked when the settings were read


# jemalloc gives freed pages back after 1 s unused instead of its default 10 s: a step's blocks are reused within
# the step, and the peak is ~15 MiB lower on the recipe at the same speed (docs/BENCHMARKS.md). 0 s costs 40%.
JEMALLOC_CONF = "dirty_decay_ms:1000,muzzy_decay_ms:0"


def environment(setting: str, current: dict[str, str]) -> dict[str, str]:
    """`LD_PRELOAD` for the recipe's processes: the allocator first, anything already preloaded kept after it;
    for jemalloc, its settings (`MALLOC_CONF`) unless the operator sets their own."""
    library = preload(setting)
    if library is None:
        return {}
    already = [part for part in current.get("LD_PRELOAD", "").replace(":", " ").split() if part]
    if library in already:
        return {}
    env = {"LD_PRELOAD": " ".join([library, *already])}
    if JEMALLOC in Path(library).name and "MALLOC_CONF" not in current:
        env["MALLOC_CONF"] = JEMALLOC_CONF
    return env
