"""Face-emotion stream worker: Kafka frame events in, LLaVA emotion results out."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: pyproject.toml's version, as installed
    __version__ = version("emotion-worker")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
