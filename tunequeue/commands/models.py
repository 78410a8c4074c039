"""`tunequeue models`: import base models into the model store and list them. A GGUF file is converted in a
child process (`worker.training.gguf_import`), so this command never imports torch."""

import subprocess
import sys
from pathlib import Path

from shared.basemodels.demo import DEMO_MODEL_ID, demo_gguf_path
from shared.basemodels.service import (
    check_model_id,
    describe_folder,
    list_base_models,
    model_folder,
    register_base_model,
)
from shared.db import session_scope
from shared.settings import get_settings
from shared.storage import get_storage
from tunequeue.console import Refused, require_current_schema, require_training_libraries, table


def run_models(args) -> int:
    require_current_schema()
    if args.action == "list":
        return list_models()
    if args.action in ("import-hf", "import-gguf"):
        check_model_id(args.name)  # before any work: the name becomes a folder and a storage prefix
    if args.action in ("import-gguf", "import-demo"):
        require_training_libraries(f"models {args.action}")  # the conversion runs on torch
    if args.action == "import-hf":
        return register_folder(args.path, args.name, source=str(args.path.resolve()))
    if args.action == "import-demo":
        return import_model(demo_gguf_path(), DEMO_MODEL_ID)
    if not args.path.is_file():
        raise Refused(f"no such GGUF file: {args.path}")
    return import_model(args.path, args.name)


def list_models() -> int:
    with session_scope() as session:
        records = list_base_models(session)
        rows = [(r.id, r.architecture, f"{r.parameters:,}", r.source) for r in records]
    if not rows:
        print("No base models imported. Import one with `tunequeue models import-demo` (SmolLM2-135M-Instruct),")
        print("`tunequeue models import-gguf PATH --name ID` or `tunequeue models import-hf FOLDER --name ID`.")
        return 0
    print(table(rows, ("ID", "ARCHITECTURE", "PARAMETERS", "SOURCE")))
    return 0


def import_model(gguf: Path, model_id: str) -> int:
    target = model_folder(get_settings().resolved_model_dir, model_id)  # the converter empties it first
    print(f"Importing {gguf.name} as {model_id!r}: dequantising to bf16 safetensors (about a minute)", flush=True)
    command = [sys.executable, "-m", "worker.training.gguf_import", str(gguf), str(target)]
    if subprocess.run(command).returncode != 0:
        raise Refused(f"converting {gguf} failed (the reason is above); nothing was imported")
    return register_folder(target, model_id, source=str(gguf))


def register_folder(folder: Path, model_id: str, source: str) -> int:
    info = describe_folder(folder)
    with session_scope() as session:
        register_base_model(session, get_storage(), model_id=model_id, folder=folder, source=source, **info)
    print(f"Imported {model_id}: {info['architecture']}, {info['parameters']:,} parameters, from {folder}")
    return 0
