"""Progress counters on stderr ("index: 12/24") that never swallow the next message.

A counter rewrites its line with a carriage return until it is done; :func:`end_line` ends a
line left open (a failed batch), so that an error printed next starts on a line of its own.
"""

from __future__ import annotations

import sys
import time

_open = [False]


def end_line() -> None:
    """Finish a progress line that is still open (call before printing an error or warning)."""
    if _open[0]:
        _open[0] = False
        print(file=sys.stderr, flush=True)


def counter(progress, what: str, total: int):
    """A ``report(done)`` function: ``progress`` False/None prints nothing, a callable is called
    as ``progress(what, done, total)``, True prints to stderr at most once a second."""
    if not progress:
        return lambda done: None
    if callable(progress):
        return lambda done: progress(what, done, total)
    last = [0.0]

    def report(done):
        now = time.monotonic()
        if done == total or now - last[0] > 1.0:
            last[0] = now
            finished = done == total
            print(f"\r{what}: {done}/{total}", end="\n" if finished else "", file=sys.stderr, flush=True)
            _open[0] = not finished

    return report
