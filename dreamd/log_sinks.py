"""Where the daemon's log lines go: the terminal (Rich) and `<data dir>/logs/dreamd.log`.

Neither may change how the daemon runs or stops. A closed stdout (`dreamd run | tee`,
tee killed by Ctrl-C) silences the terminal for good: Rich's answer to a broken pipe,
SystemExit(1) from whatever thread was logging, once ended a stop half way. A log file
that cannot be written (disk full, read-only) is said once on stderr, then the lines go
to the terminal only until it can be written again: never a traceback per line.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.logging import RichHandler


def silence(stream: TextIO | None) -> None:
    """Point a broken stream's file descriptor at the null device, so later writes (and
    the interpreter's last flush, whose failure would change the exit status) succeed."""
    try:
        fd = stream.fileno() if stream is not None else -1
    except (OSError, ValueError, AttributeError):
        return
    if fd < 0:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass


def say(text: str) -> None:
    """One line on stderr, if stderr is still there."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def finish_streams() -> None:
    """Before exiting: flush stdout and stderr, silencing a closed one, so a reader that
    went away cannot turn a clean exit into status 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            silence(stream)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # Rich's default raises SystemExit(1) in whichever thread was logging
        self.quiet = True
        silence(self.file)


class TerminalHandler(RichHandler):
    """Rich on the terminal; a closed pipe turns it off, never the daemon."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(console=_Console(stderr=False), **kwargs)
        self.gone = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.gone:
            return
        try:
            super().emit(record)
        except (SystemExit, OSError, ValueError):
            self._gone()

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ValueError)):   # the terminal or pipe went away
            self._gone()
            return
        super().handleError(record)

    def _gone(self) -> None:
        self.gone = True
        self.console.quiet = True
        silence(self.console.file)


class LogFile(logging.handlers.RotatingFileHandler):
    """The log file. A failed write is reported once (stderr), later ones are counted,
    and the first line that gets through again says how many were lost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing = False
        self.lost = 0
        self._failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)
        if self._failed_now:
            self.lost += 1
        elif self.failing:
            self.failing, lost = False, self.lost
            self.lost = 0
            note = logging.LogRecord(record.name, logging.WARNING, __file__, 0,
                                     "the log file can be written again (%d lines lost)",
                                     (lost,), None)
            super().emit(note)

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if not self.failing:
            self.failing = True
            exc = sys.exc_info()[1]
            say(f"dreamd: cannot write the log file {self.baseFilename} ({exc}); log lines "
                f"go to the terminal only until it can be written again")
