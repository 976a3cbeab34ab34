"""Running the worker: metrics, health endpoints, logging, the multi-GPU supervisor, `check`."""
