"""Face-emotion stream worker: Kafka frame events in, LLaVA emotion results out."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: pyproject.toml's version, as installed
    __version__ = version("emotion-worker")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# How the worker names itself to image servers (HTTP User-Agent, S3 user-agent suffix).
USER_AGENT = f"emotion-worker/{__version__}"
