"""The QLoRA recipe. Runs alone, with no Celery, database or object storage:

    python -m worker.training --config cfg.json --out DIR

Nothing here is imported by the Celery process, so CUDA is never initialised there."""
