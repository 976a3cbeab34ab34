"""Windowed per-stream summaries of the results topic: `emotion-worker summarize`.

``results`` reads a result record (schema 2, or 1 from before 0.4.0) into the few facts a
window needs; ``windows`` is the aggregation itself, pure values with no Kafka (add a
result, drop duplicates and late ones, close windows by watermark or idleness); ``state``
encodes the changelog of the open windows and applies it back; ``restore`` reads a
partition's changelog back from Kafka on assignment; ``loop`` is the consume, aggregate,
produce loop in Kafka transactions; ``topics`` checks and creates the topics; ``health``
its metrics and probes; ``command`` the flags (imported by the CLI, so it stays light).
Import from the modules: the package imports nothing.
"""
