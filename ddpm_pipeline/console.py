"""Console output that outlives its reader.

From accelerate 1.16 on, a single-process ``accelerate launch`` reads its training process's stderr
through a pipe and writes it on. When that launcher dies (SIGKILL, the out-of-memory killer), the
next log line or progress bar the training process writes to the pipe raises `BrokenPipeError`,
which would end the run where it stands and lose its steps since the last checkpoint. With
:func:`keep_stderr_writable`, the run instead goes on writing to ``os.devnull`` until it notices
that its launcher has exited (:mod:`~ddpm_pipeline.stop_signals`) and writes the checkpoint of its
step.
"""

from __future__ import annotations

import os
import sys
from contextlib import suppress
from typing import Any, TextIO


class OutlivesItsReader:
    """A text stream that writes to ``stream`` until its reader is gone: on the first
    `BrokenPipeError`, ``stream``'s file descriptor is pointed at ``os.devnull`` (``os.dup2``), so
    this and every other writer of that descriptor (the original ``sys.__stderr__`` included) write
    there from then on, without error. Everything else is ``stream``'s own."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        #: Whether the reader has gone and output is being discarded.
        self.reader_gone = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard_from_now_on()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard_from_now_on()

    def _discard_from_now_on(self) -> None:
        self.reader_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with suppress(OSError):
            self._stream.flush()  # what the failed write left in the buffer goes there too

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def keep_stderr_writable() -> None:
    """Make ``sys.stderr`` an :class:`OutlivesItsReader` of itself (once), when it writes to a file
    descriptor. Call it before logging handlers or progress bars take ``sys.stderr``."""
    if isinstance(sys.stderr, OutlivesItsReader):
        return
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no descriptor: a test's capture, a notebook
        return
    sys.stderr = OutlivesItsReader(sys.stderr)
