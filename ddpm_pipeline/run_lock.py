"""One training run at a time per output folder.

Two runs writing into the same ``--output_dir`` (the same command started twice, or a resume
started while the run is still going) would interleave their checkpoints, loss histories and
pipelines into a folder that belongs to neither. The run's main process therefore holds an
advisory lock (``flock``) on ``<output_dir>/.train.lock`` while it trains; a second run is refused,
naming the first. The operating system drops the lock when its process ends however it ends, so a
run that crashed or was killed never leaves a stale lock behind: its resume simply takes it.
Where there is no ``flock`` (Windows) or the file system refuses locks, runs are not guarded, and
a warning says so.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import socket
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
#: What ``flock`` raises when another open file holds the lock.
_HELD_ELSEWHERE = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}


class OutputDirLockedError(RuntimeError):
    """Another training run holds the output folder's lock."""


class OutputDirLock:
    """The lock of ``output_dir``: ``with OutputDirLock(folder):`` holds it for the block;
    :meth:`check` only asks whether another run holds it (raising
    :class:`OutputDirLockedError` if so), so a run can refuse before any work."""

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self) -> bool:
        """Take the lock and record this process in the file; ``False`` where locks are unavailable."""
        try:
            import fcntl
        except ImportError:  # Windows
            logger.warning(f"cannot lock {self.folder} on this system: start only one run into it at a time")
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not recorded itself yet"
            handle.close()
            if error.errno in _HELD_ELSEWHERE:
                raise OutputDirLockedError(
                    f"Another training run is writing to {self.folder} ({holder}). Wait for it to finish, stop it "
                    "(Ctrl-C or SIGTERM: it writes a checkpoint first, to continue with --resume_from_checkpoint "
                    "latest), or pick another --output_dir."
                ) from error
            logger.warning(f"cannot lock {self.folder} ({error.strerror or error}): start only one run into it at a time")
            return False
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        handle.flush()
        self._handle = handle
        return True

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it could let two later runs lock two files)."""
        if self._handle is None:
            return
        import fcntl

        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def check(self) -> None:
        """Refuse now, with :class:`OutputDirLockedError`, if another run holds the lock."""
        if self.path.exists() and self.acquire():
            self.release()

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
