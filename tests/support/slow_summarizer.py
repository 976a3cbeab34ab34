"""`emotion-worker summarize` whose transactions stay open a while before they commit.

A transaction of the summarizer lasts milliseconds, so a kill at a random instant rarely
lands inside one. Through this wrapper every transaction is flushed to the broker (its
summaries, state records and offsets are written, not yet committed), logged as
"transaction open" with how many summaries it holds, and held open for
SUMMARIZER_COMMIT_DELAY_S seconds before it commits: a test that sees the line can kill
the process inside it. Everything else is the production code.
"""

from __future__ import annotations

import os
import sys
import time

import structlog

from consumer.cli import main
from consumer.summarize.loop import Summarizer

_real_commit = Summarizer._commit_transaction
_delay_s = float(os.environ.get("SUMMARIZER_COMMIT_DELAY_S", "0"))


def _slow_commit(self: Summarizer) -> None:
    assert self._producer is not None
    self._producer.flush(30)
    summaries = sum(len(closed) for closed in self._closed.values())
    structlog.get_logger("tests.support.slow_summarizer").info(
        "transaction open", summaries=summaries, delay_s=_delay_s
    )
    time.sleep(_delay_s)
    _real_commit(self)


Summarizer._commit_transaction = _slow_commit  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
