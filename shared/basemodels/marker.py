"""What a model folder records of the files verified in it (`.tunequeue-verified.json`): each file's sha256
with the size and modification time it had when hashed, so that an unchanged file is never hashed again."""

import json
import os
import threading
from pathlib import Path

from shared.checksums import sha256_file

VERIFIED_MARKER = ".tunequeue-verified.json"


def fingerprint(path: Path, sha256: str) -> dict | None:
    """What the marker records of a verified file: any write to it changes its size or modification time."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / VERIFIED_MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    # An entry of another shape (an older marker kept only the sha256) is hashed again, once.
    return (
        {name: entry for name, entry in marker.items() if isinstance(entry, dict)} if isinstance(marker, dict) else {}
    )


def write_marker(folder: Path, verified: dict) -> None:
    """Atomically: validation and training may verify the same folder at once."""
    partial = folder / f"{VERIFIED_MARKER}.part-{os.getpid()}-{threading.get_ident()}"
    partial.write_text(json.dumps(verified, sort_keys=True))
    partial.replace(folder / VERIFIED_MARKER)


def local_sha256s(folder: Path, names: list[str]) -> dict[str, str]:
    """The sha256 of each named file of a local model folder: the verified one where the file is unchanged since
    it was hashed, else hashed now and recorded where the folder can be written (one imported by hand has no
    record yet)."""
    verified = read_marker(folder)
    unrecorded = [n for n in names if (e := verified.get(n)) is None or fingerprint(folder / n, e["sha256"]) != e]
    for name in unrecorded:
        verified[name] = fingerprint(folder / name, sha256_file(folder / name))
    if unrecorded:
        try:
            write_marker(folder, verified)
        except OSError:
            pass
    return {name: verified[name]["sha256"] for name in names}
