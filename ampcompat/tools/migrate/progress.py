"""A progress line on stderr for runs over large trees (silent for short runs)."""
from __future__ import annotations

import time
from typing import Callable, Optional, TextIO

_QUIET_FOR = 2.0  # seconds before the first line: small runs print nothing
_TTY_EVERY = 0.2
_LOG_EVERY = 10.0  # a log file gets a full line this often, not a line per update


class Progress:
    """Counts files as they are processed and reports ``migrate: N/TOTAL files...`` now and then.

    On a terminal the line is redrawn in place and erased at the end; elsewhere (CI logs) a full
    line is written every few seconds.

    Args:
        total: how many files the run will process.
        stream: where to write (normally ``sys.stderr``).
        clock: a monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, total: int, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._last: Optional[float] = None
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._drawn = False

    def advance(self, what: str) -> None:
        """Count one more file; ``what`` says which phase the run is in (``reading``, ``rewriting``)."""
        self.done += 1
        now = self._clock()
        if now - self._start < _QUIET_FOR:
            return
        if self._last is not None and now - self._last < (_TTY_EVERY if self._tty else _LOG_EVERY):
            return
        self._last = now
        line = f"migrate: {what} {self.done}/{self.total} files ({now - self._start:.0f} s)"
        if self._tty:
            self._stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def restart(self, total: int) -> None:
        """Start counting a new phase of ``total`` files (the clock keeps running)."""
        self.total, self.done = total, 0

    def finish(self) -> None:
        """Erase the in-place line, if one was drawn."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False
