"""The live page: `emotion-worker dashboard` serves the window summaries of the last minutes.

``store`` keeps them (bounded, per stream), ``live`` hands new ones to the open pages,
``reader`` reads the summaries topic, ``server`` is the HTTP server (the page, server-sent
events, a JSON snapshot, auth), ``app`` wires them (``start_dashboard``, which the demo
calls) and ``command`` is the CLI. This package's ``__init__`` imports nothing: the CLI
imports ``command`` on every start, and `emotion-worker --help` must stay fast.
"""
