"""Celery tasks (thin) and the QLoRA recipe (`worker.training`, the only place that imports torch).

A worker reaches no model hub of its own accord: base models are registered from local files, and every process
of the worker (training, evaluation, export, serving) inherits `HF_HUB_OFFLINE=1` unless its operator set
`HF_HUB_OFFLINE` otherwise. Without it, importing bitsandbytes on a CPU with AVX512-BF16 asks the Hugging Face
Hub for a CPU kernel each time (and waits on the network where there is none); offline, bitsandbytes uses its
own CPU kernels, and its note saying so is silenced."""

import logging
import os

if "HF_HUB_OFFLINE" not in os.environ:
    os.environ["HF_HUB_OFFLINE"] = "1"
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
