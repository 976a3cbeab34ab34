"""Dead letters back onto the input topic: `emotion-worker replay`.

``command`` holds its flags (imported by the CLI, so it stays light), ``selection``
decides per letter (its kind, its age, earlier replays of its kind) and ``replayer``
reads the dead-letter topic and republishes in Kafka transactions. Import from the
modules: the package imports nothing, so `emotion-worker --help` loads no Kafka client.
"""
