"""The stream runtime: Kafka plumbing of the worker, and an in-memory broker for tests."""
