"""Celery tasks (thin) and the QLoRA recipe (`worker.training`, the only place that imports torch)."""
