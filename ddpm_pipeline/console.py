"""The command lines' console: errors for people, and output that outlives its reader.

**Errors.** What this package raises for bad input (an option, a path, the data, a full disk, a
diverging run) says what is wrong and how to fix it. :func:`run_command` prints that message alone,
``train_ddpm.py: error: …``, as argparse reports a bad option, instead of a traceback that buries it
(twice over under accelerate 1.16's launcher, which repeats the tail of its child's stderr in its own
traceback). Errors raised anywhere else keep their traceback, and so do all with
``DDPM_PIPELINE_TRACEBACK=1`` in the environment.

**Output.** From accelerate 1.16 on, a single-process ``accelerate launch`` reads its training
process's stderr through a pipe and writes it on. When that launcher dies (SIGKILL, the
out-of-memory killer), the next log line or progress bar the training process writes to the pipe
raises `BrokenPipeError`, which would end the run where it stands and lose its steps since the last
checkpoint. With :func:`keep_stderr_writable`, the run instead goes on writing to ``os.devnull``
until it notices that its launcher has exited (:mod:`~ddpm_pipeline.stop_signals`) and writes the
checkpoint of its step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO, TypeVar

#: The exception types this package raises for bad input, each with a message naming the fix (the
#: out-of-memory error a training step reports, `torch.OutOfMemoryError`, is a `RuntimeError`).
USER_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)
PACKAGE_FOLDER = Path(__file__).resolve().parent
#: Set (to anything) to see the traceback of every error.
TRACEBACK_VARIABLE = "DDPM_PIPELINE_TRACEBACK"
T = TypeVar("T")


def raised_by_this_package(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback (where it was raised) is in this package."""
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_FOLDER)


def run_command(main: Callable[[], T], program: str) -> T:
    """``main()``; an error of :data:`USER_ERRORS` that this package raised ends the program instead
    with ``{program}: error: {message}`` on stderr and exit status 1, without a traceback (unless
    :data:`TRACEBACK_VARIABLE` is set)."""
    try:
        return main()
    except USER_ERRORS as error:
        if not raised_by_this_package(error) or os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"{program}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


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
        """Write to the stream; once its reader has gone (a broken pipe), to nowhere."""
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard_from_now_on()
            return len(text)

    def flush(self) -> None:
        """Flush the stream; once its reader has gone, do nothing."""
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
