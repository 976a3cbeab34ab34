"""The `--version` text: the worker's version and those of the libraries that matter."""

from __future__ import annotations

from importlib import metadata


def version_text() -> str:
    """`emotion-worker X.Y.Z` and the versions of the libraries that matter, without torch."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        import confluent_kafka

        librdkafka = str(confluent_kafka.libversion()[0])
    except ImportError:
        librdkafka = "not installed"
    return (
        f"emotion-worker {version('emotion-worker')}\n"
        f"confluent-kafka {version('confluent-kafka')} (librdkafka {librdkafka}), "
        f"torch {version('torch')}, transformers {version('transformers')}"
    )
