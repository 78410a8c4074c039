"""Completions from base and fine-tuned models (`/v1/chat/completions`, `/v1/completions`), the API's side:
which model a request names, which inference worker serves it, and how many requests a tenant has in flight.
The models themselves run in `worker/inference/` (docs/inference.md)."""
