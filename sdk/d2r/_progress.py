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


def counter(progress, what: str, total: int, unit: str | None = None):
    """A ``report(done)`` function: ``progress`` False/None prints nothing, a callable is called
    as ``progress(what, done, total)``, True prints to stderr at most once a second. With a
    ``unit`` (``"photos"``) the line also says the rate and the time left:
    ``index: 120/1000 photos, 3.1 photos/s, 4m40s left``."""
    if not progress:
        return lambda done: None
    if callable(progress):
        return lambda done: progress(what, done, total)
    last = [0.0]
    t0 = time.monotonic()

    def report(done):
        now = time.monotonic()
        if done == total or now - last[0] > 1.0:
            last[0] = now
            finished = done == total
            text = f"{what}: {done}/{total}"
            if unit is not None:
                text += f" {unit}"
                rate = done / (now - t0) if done > 0 and now - t0 >= 1.0 else 0.0  # no rate from the first instant
                if rate > 0:
                    text += f", {rate:.1f} {unit}/s" + ("" if finished else f", {duration((total - done) / rate)} left")
            print(f"\r{text}\033[K" if unit is not None else f"\r{text}", end="\n" if finished else "", file=sys.stderr, flush=True)
            _open[0] = not finished

    return report


def duration(seconds: float) -> str:
    """``42s``, ``4m40s``, ``2h05m``."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
