"""FastAPI app: routers only parse, call a service and shape the response."""
