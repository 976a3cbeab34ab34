"""Face-emotion stream worker: Kafka frame events in, LLaVA emotion results out."""

__version__ = "0.1.0"
