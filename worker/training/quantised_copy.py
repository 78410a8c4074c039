"""A local copy of a base model as bitsandbytes quantised it, kept beside the base, so that later loads read the
4-bit weights and their quantisation state as they are instead of reading the 16-bit weights and quantising them
again: less to read, no full-precision weights in memory, and the same bytes (bitsandbytes quantises
deterministically, and the copy is keyed by everything that decides the result).

A copy lives in `<base>/.quantised/<key>/`: the key hashes the base's weights and config (their sha256), the
quantisation settings, the compute dtype, the device kind and the library versions. It is written to a folder of
its own and renamed into place once complete, with the sha256 of each of its files; a copy whose files do not
match them (a partial write, a damaged disk) is removed and built again. Where the base's folder cannot be written,
loads quantise every time, as they did before."""

import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.basemodels.marker import local_sha256s
from shared.checksums import sha256_file

COPIES = ".quantised"
CONTENTS = "contents.json"  # written last: a copy without it never completed
KEY_FILES = ("config.json",)  # besides the weights: the architecture the weights are read into


def copy_folder(base: Path, settings: dict[str, Any]) -> Path:
    """Where the copy of `base` under `settings` (quantisation, dtype, device, versions) lives."""
    names = sorted(p.name for p in base.glob("*.safetensors")) + [n for n in KEY_FILES if (base / n).is_file()]
    key = json.dumps({"base": local_sha256s(base, names), **settings}, sort_keys=True, default=str)
    return base / COPIES / hashlib.sha256(key.encode()).hexdigest()[:24]


def load_or_build(folder: Path, load: Callable[[Path], Any], quantise: Callable[[], Any]) -> Any:
    """The model from the copy in `folder` if it is whole; otherwise quantised afresh, and the copy written."""
    if is_whole(folder):
        return load(folder)
    model = quantise()
    try:
        write(model, folder)
    except OSError as exc:  # a read-only model store: the next load quantises again
        print(f"tunequeue: could not keep a quantised copy in {folder}: {exc}", file=sys.stderr)
    return model


def is_whole(folder: Path) -> bool:
    """Complete and unchanged since it was written; anything else there is removed."""
    if not folder.is_dir():
        return False
    try:
        contents = json.loads((folder / CONTENTS).read_text())
        if is_model(contents) and all(sha256_file(folder / name) == sha256 for name, sha256 in contents.items()):
            return True
    except (OSError, ValueError, AttributeError):
        pass
    discard(folder)
    return False


def write(model, folder: Path) -> None:
    partial = folder.with_name(f"{folder.name}.part-{os.getpid()}-{threading.get_ident()}")
    discard(partial)
    try:
        model.save_pretrained(partial, safe_serialization=True)
        contents = {p.name: sha256_file(p) for p in sorted(partial.iterdir()) if p.is_file()}
        if not is_model(contents):  # a rank other than 0 of a torchrun job: transformers saves on rank 0 only
            discard(partial)
            return
        (partial / CONTENTS).write_text(json.dumps(contents, sort_keys=True))
        partial.rename(folder)
    except OSError:
        if folder.is_dir():  # another process completed the same copy first: keep theirs
            discard(partial)
            return
        discard(partial)
        raise


def is_model(contents: dict[str, str]) -> bool:
    """A config and weights among the files: what `from_pretrained` needs to read the copy back."""
    return KEY_FILES[0] in contents and any(name.endswith(".safetensors") for name in contents)


def discard(folder: Path) -> None:
    """Renamed aside before removal, so that no reader ever sees half of a removed copy."""
    if not folder.exists():
        return
    aside = folder.with_name(f"{folder.name}.removed-{os.getpid()}-{threading.get_ident()}")
    try:
        folder.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
