"""Base models: imported once into the model store (files in object storage, a row here); each worker
keeps a verified local copy."""

import json
import math
import os
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.basemodels.errors import UnknownBaseModel
from shared.basemodels.marker import fingerprint, read_marker, write_marker
from shared.basemodels.models import BaseModelRecord
from shared.checksums import sha256_file
from shared.errors import InvalidRequest
from shared.ids import now
from shared.storage import Storage

# A base model's id names its folder in every worker's model store and its prefix in object storage: one path
# component, never '/', '..', a space or empty. No ':' either: fine-tuned models are `ft:<base>:<suffix>:<job>`.
BASE_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_id(model_id: str) -> str:
    if not BASE_MODEL_ID.fullmatch(model_id):
        raise InvalidRequest(
            f"Invalid base model name {model_id!r}: 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (no '/', ':' or spaces), e.g. my-llama-1b",
            param="name",
        )
    return model_id


def model_folder(model_dir: Path, model_id: str) -> Path:
    """The local folder of a base model: always directly inside the model store, whatever the name says."""
    root = Path(os.path.normpath(model_dir.expanduser().absolute()))
    folder = Path(os.path.normpath(root / check_model_id(model_id)))
    if folder.parent != root:
        raise InvalidRequest(f"Base model name {model_id!r} leads outside the model store {root}", param="name")
    return folder


def list_base_models(session: Session) -> list[BaseModelRecord]:
    return list(session.scalars(select(BaseModelRecord).order_by(BaseModelRecord.id)))


def get_base_model(session: Session, model_id: str) -> BaseModelRecord:
    record = session.get(BaseModelRecord, model_id)
    if record is None:
        raise UnknownBaseModel(model_id, [m.id for m in list_base_models(session)])
    return record


def register_base_model(
    session: Session,
    storage: Storage,
    *,
    model_id: str,
    folder: Path,
    source: str,
    architecture: str,
    parameters: int,
    linear_modules: list[str],
) -> BaseModelRecord:
    """Upload an imported model folder to storage and record it (replacing an earlier import of the id)."""
    prefix = f"models/{check_model_id(model_id)}"
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        _, sha256 = storage.put_file(f"{prefix}/{path.name}", path)
        files[path.name] = sha256
    record = session.get(BaseModelRecord, model_id) or BaseModelRecord(id=model_id)
    record.source = source
    record.storage_prefix = prefix
    record.architecture = architecture
    record.parameters = parameters
    record.linear_modules = linear_modules
    record.files = files
    record.created_at = now()
    session.merge(record)
    session.flush()
    _mark_verified(folder, files)
    return record


PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_unsafe_folder(folder: Path, config: dict) -> None:
    """Base models are safetensors and data files only: loading one must never run code, so pickled weights,
    Python files and configs that ask for remote code are refused."""
    unsafe = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED or p.suffix == ".py")
    if unsafe:
        raise ValueError(f"{folder}: refusing {', '.join(unsafe)}: only safetensors weights, no pickles or code")
    if "auto_map" in config or any(
        "auto_map" in json.loads(p.read_text()) for p in folder.glob("tokenizer_config.json")
    ):
        raise ValueError(f"{folder}: its config asks for custom code (auto_map); only built-in architectures load")


def describe_folder(folder: Path) -> dict:
    """Architecture and parameter count of a Hugging Face model folder, read from config.json and the
    safetensors headers (no torch needed)."""
    config_path = folder / "config.json"
    weights = sorted(folder.glob("*.safetensors"))
    if not config_path.is_file() or not weights:
        raise FileNotFoundError(f"{folder} needs config.json and *.safetensors (a Hugging Face model folder)")
    config = json.loads(config_path.read_text())
    refuse_unsafe_folder(folder, config)
    if not (folder / "tokenizer.json").is_file():
        # Dataset checks and the loss mask read tokenizer.json (the `tokenizers` library, no torch): without it
        # every job on this model would fail at validation.
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json: save the tokenizer beside the weights "
            "(`AutoTokenizer.from_pretrained(...).save_pretrained(folder)`) and import again"
        )
    parameters = 0
    linear = set()
    for path in weights:
        with open(path, "rb") as stream:
            header = json.loads(stream.read(int.from_bytes(stream.read(8), "little")))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            parameters += math.prod(tensor["shape"])
            # A 2-D weight inside the repeated blocks is a linear layer LoRA can target (q_proj, up_proj, ...).
            parts = name.split(".")
            if parts[-1] == "weight" and len(tensor["shape"]) == 2 and any(p.isdigit() for p in parts):
                linear.add(parts[-2])
    return {
        "architecture": (config.get("architectures") or ["unknown"])[0],
        "parameters": parameters,
        "linear_modules": sorted(linear),
    }


def check_target_modules(record: BaseModelRecord, targets: list[str] | str) -> None:
    if targets == "all-linear" or not record.linear_modules:
        return
    unknown = sorted(set(targets) - set(record.linear_modules))
    if unknown:
        raise InvalidRequest(
            f"{record.id} has no module(s) named {', '.join(unknown)}; its linear modules are "
            f'{", ".join(record.linear_modules)} (or use "all-linear")',
            param="lora_target_modules",
        )


def ensure_local_copy(
    record: BaseModelRecord, storage: Storage, model_dir: Path, only: tuple[str, ...] | None = None
) -> Path:
    """Return a local folder holding the recorded files (or `only` those of them), downloading what is
    missing or stale; everything is checked against its sha256. A file verified before and unchanged since
    (same size and modification time as when it was hashed) is not hashed again: a 259 MB base would
    otherwise cost every attempt a full read."""
    folder = model_folder(model_dir, record.id)
    folder.mkdir(parents=True, exist_ok=True)
    verified = read_marker(folder)
    wanted = {k: v for k, v in record.files.items() if only is None or k in only}
    for name, expected in wanted.items():
        path = folder / name
        current = fingerprint(path, expected)
        if current is not None and verified.get(name) == current:
            continue
        if not (path.is_file() and sha256_file(path) == expected):
            actual = storage.download(f"{record.storage_prefix}/{name}", path)
            if actual != expected:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"model file {name} of {record.id} failed its checksum")
        verified[name] = fingerprint(path, expected)
    write_marker(folder, verified)
    return folder


def _mark_verified(folder: Path, files: dict) -> None:
    write_marker(folder, {name: fingerprint(folder / name, sha256) for name, sha256 in files.items()})
