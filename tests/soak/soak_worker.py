"""`emotion-worker` as the soak runs it: the fault suite's faulty-decoder worker, which can
also say where it is stuck.

Everything is the production worker, except the decoder processes of
tests.faults.faulty_decoder_worker (they segfault on a b"CRASH" payload) and one addition:
SIGUSR1 makes the process write every thread's Python stack to its log (faulthandler), so a
worker that does not stop when told to can be asked where it hangs before it is killed.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import tests.faults.faulty_decoder_worker  # noqa: F401  (its decoder processes, on import)
from consumer.cli import main

faulthandler.register(signal.SIGUSR1, all_threads=True)

if __name__ == "__main__":
    sys.exit(main())
