"""Serving: base models held quantised (NF4, int8 or 16-bit) with fine-tuned LoRA adapters applied unmerged, many
adapters on one loaded base, concurrent requests decoded together (docs/inference.md).

`engine` holds the models and decodes; `server` is the worker's HTTP endpoint the API forwards requests to;
`registry` tells the database where this worker listens and what it holds, so the API can route to it."""
