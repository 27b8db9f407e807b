"""Helpers shared by the commands: durations, secrets from files or the environment, retry delays.

They parse what a user typed, so their errors name the option (``--every``, ``--token-file``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..errors import InputError


def parse_interval(text: str, flag: str = "duration") -> float:
    """'90', '90s', '15m', '2h' -> seconds; :class:`InputError` naming ``flag`` (the option
    that gave ``text``, e.g. ``--every``) otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if not m:
        raise InputError(f"{flag}: expected a duration like 30s, 15m or 2h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def read_secret_file(path, what: str, warn=None) -> str:
    """The secret in file ``path`` (stripped). Warns through ``warn`` (default: stderr) when the
    file is readable or writable by its group or by others (chmod 600 it)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    if os.name == "posix" and mode & 0o077:
        message = (f"warning: {path} holds the {what} but is accessible to its group or to others "
                   f"(mode {mode & 0o777:o}); run: chmod 600 {path}")
        (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(message)
    return text


def resolve_token(token: str | None, token_file, env_var: str, what: str) -> str | None:
    """A token from --token-file, else the environment variable ``env_var``, else --token
    (which other local users can see in the process list: warned)."""
    if token_file:
        return read_secret_file(token_file, what)
    if os.environ.get(env_var):
        return os.environ[env_var].strip()
    if token:
        print(f"warning: --token puts the {what} in the process list (visible to other users); prefer "
              f"--token-file FILE (mode 600) or the {env_var} environment variable", file=sys.stderr, flush=True)
    return token


def backoff_delays(interval: float, first: float = 1.0):
    """Delays after consecutive failures: first, 2*first, 4*first, ... capped at ``interval``
    (and at one hour)."""
    delay = max(float(first), 0.01)
    while True:
        yield min(delay, max(interval, 0.01), 3600.0)
        delay *= 2
