"""Telling a full disk from other failures. A full disk is the node's fault, not the job's: the worker requeues
the attempt (error code `disk_full`) instead of failing the job. Light on purpose: the worker's Celery
process imports this too."""

import errno
import shutil
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do their own I/O word it (safetensors: "No space left on device (os error 28)").
NO_SPACE_WORDING = ("No space left on device", "Disk quota exceeded")
# After a write ran out of space, what is left is less than a page or two; 1 MiB leaves a wide margin.
FULL_BELOW_BYTES = 1 << 20


def is_disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether `exc`, or an exception it was raised from, is a write that found no space left. torch.save says
    only "unexpected pos …" when the disk fills under it: given the folder it wrote into, a disk with
    (almost) nothing free there counts too."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        if any(words in str(seen) for words in NO_SPACE_WORDING):
            return True
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return folder is not None and free_bytes(folder) < FULL_BELOW_BYTES


def free_bytes(folder: Path) -> int:
    """Free space on the filesystem that holds `folder` (or its nearest existing parent)."""
    existing = next((path for path in (folder, *folder.parents) if path.exists()), Path("/"))
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return FULL_BELOW_BYTES  # unknown: not evidence of a full disk
