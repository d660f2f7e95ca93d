"""A Ctrl-C before a command takes over its signals: noted, not raised.

Imported first by the package, so from the first instant of the `task-runner` command (the
console script, or `python -m service.cli`) a Ctrl-C is only noted until a command takes
over its signals: a KeyboardInterrupt while the modules load would print a traceback, and
nothing has been started yet. Imported by other code, it changes nothing.
"""

from __future__ import annotations

import signal
import sys

NOTED: list[int] = []
# Started in the background by a shell script, SIGINT is ignored: it stays so.
SIGINT_IGNORED = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
# While `python -m service.cli` imports this package, sys.argv[0] is "-m".
_COMMAND = sys.argv[:1] == ["-m"] or (bool(sys.argv) and sys.argv[0].endswith("task-runner"))
if not SIGINT_IGNORED and _COMMAND:
    signal.signal(signal.SIGINT, lambda signum, frame: NOTED.append(signum))
