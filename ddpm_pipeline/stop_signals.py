"""Graceful stops: a training run that receives a stop signal finishes its optimizer step, writes a
checkpoint and ends, so ``--resume_from_checkpoint latest`` continues without losing work.

The signals a run is asked to stop with: ``SIGTERM`` (what Kubernetes, SLURM at the time limit,
``torchrun`` and ``kill`` send before ``SIGKILL``), ``SIGINT`` (Ctrl-C) and ``SIGUSR1`` (SLURM's
``--signal=USR1@SECONDS`` warning before the time limit). A second signal acts at once, as it
would have without the handler, so a stuck run can still be stopped; one within
:data:`REPEAT_WINDOW_SECONDS` of the first is the same request delivered twice and changes nothing.
Twice is how a stop often arrives: a terminal's Ctrl-C (``SIGINT``) and SLURM's ``SIGTERM`` reach
every process of the job, and a launcher that passes them on (``accelerate launch`` from 1.16, as
``SIGTERM``) sends its own right after.

A run started by ``accelerate launch`` or ``torchrun`` also stops (with its checkpoint) when that
launcher has exited: a launcher killed by a signal it does not pass on (SIGKILL, or SIGUSR1, which
``torchrun``'s agent does not handle) would otherwise leave its training processes running on
their own, on GPUs nothing would free.

Nothing happens inside the handler but recording the signal: the training loop asks
:meth:`StopRequest.reason` between steps (every step in one process; every ``--log_every`` steps
with several, where the processes agree on the step through one all-gather).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

#: The stop signals of a training run unless told otherwise (those this platform has).
DEFAULT_STOP_SIGNALS = tuple(name for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
UNCATCHABLE = ("SIGKILL", "SIGSTOP")
#: :meth:`StopRequest.reason` when the launcher that started this process has exited.
LAUNCHER_EXITED = "launcher exited"
#: A stop signal this soon (seconds) after the first is the same request delivered twice, not a second one.
REPEAT_WINDOW_SECONDS = 1.0
#: Environment variables that ``accelerate launch`` / ``torchrun`` set for the processes they start.
LAUNCHER_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")


def started_by_launcher() -> bool:
    """Whether ``accelerate launch`` or ``torchrun`` started this process (their environment)."""
    return any(name in os.environ for name in LAUNCHER_MARKERS)


def lone_process_advice(program: str) -> str | None:
    """What to do when ``accelerate launch`` was asked for several processes and started this one
    alone, else None.

    Without ``--multi_gpu`` (or a config that sets it), ``accelerate launch --num_processes N``
    starts a single process on a machine without CUDA, and with ``--cpu`` anywhere: its simple
    launcher sets ``MASTER_ADDR`` for the N processes it was asked for, but not ``WORLD_SIZE``,
    which a launch of several processes (``torchrun``, under ``--multi_gpu``) sets for each one.
    """
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ or "MASTER_ADDR" not in os.environ or "WORLD_SIZE" in os.environ:
        return None
    return (f"`accelerate launch` was asked for several processes (it set MASTER_ADDR) but started this one alone: "
            "on a machine without CUDA, or with --cpu, it starts several only with --multi_gpu. This run goes on as "
            f"one process; for N on the CPU, `accelerate launch --multi_gpu --num_processes N {program} ...` "
            "(they join over gloo).")  # fmt: skip


def signal_name(text: str) -> str:
    """The canonical name of a signal given as ``"SIGTERM"``, ``"TERM"``, ``"term"`` or ``"15"``.

    Raises `ValueError` for a signal this platform lacks or one no process can catch
    (``SIGKILL``, ``SIGSTOP``), naming the usual choices.
    """
    raw = str(text).strip()
    if raw.isdigit():
        try:
            name = signal.Signals(int(raw)).name
        except ValueError:
            name = raw
    else:
        name = raw.upper() if raw.upper().startswith("SIG") else "SIG" + raw.upper()
    if name in UNCATCHABLE:
        raise ValueError(f"{name} cannot be caught by any process, so no checkpoint can be written on it; "
                         f"use {', '.join(DEFAULT_STOP_SIGNALS)}.")  # fmt: skip
    if not isinstance(getattr(signal, name, None), signal.Signals):
        raise ValueError(f"{text!r} is not a signal on this platform; use e.g. {', '.join(DEFAULT_STOP_SIGNALS)}.")
    return name


def signal_number(name: str) -> int:
    """The number of a signal named as :func:`signal_name` accepts it (``"SIGTERM"`` → 15 on Linux)."""
    return int(getattr(signal, signal_name(name)))


class StopRequest:
    """A context manager that turns the first of ``signals`` into a request to stop.

    With ``watch_launcher``, :meth:`reason` also reports a parent process (the launcher) that has
    exited. Inside the ``with`` block the first such signal only sets :attr:`received` (its name);
    one within ``repeat_window`` seconds of it is taken for the same request delivered twice and
    ignored; a later one restores the handler that was there before and delivers the signal to it
    (the default action for ``SIGTERM``/``SIGUSR1`` ends the process, Python's for ``SIGINT`` raises
    `KeyboardInterrupt`). Leaving the block restores the previous handlers. A signal this process
    ignores on entry stays ignored and is listed in :attr:`ignored`, as Python leaves an inherited
    ``SIG_IGN`` for ``SIGINT`` alone: a shell without job control starts ``command &`` with Ctrl-C
    ignored, so that the Ctrl-C meant for what runs in the foreground does not reach it. Handlers
    can only be set in the main thread: elsewhere (a notebook's worker thread) the block changes
    nothing and :attr:`active` is False.
    """

    def __init__(
        self,
        signals: Iterable[str] = DEFAULT_STOP_SIGNALS,
        watch_launcher: bool = False,
        repeat_window: float = REPEAT_WINDOW_SECONDS,
    ):
        self.signals = [signal.Signals(signal_number(name)) for name in signals]
        self.repeat_window = repeat_window
        self.received: str | None = None
        self._received_at = 0.0
        self.ignored: list[str] = []
        self.active = False
        self._previous: dict[signal.Signals, Any] = {}
        self.launcher_pid = os.getppid() if watch_launcher else None

    def reason(self) -> str | None:
        """Why to stop: the first signal's name, :data:`LAUNCHER_EXITED` when watching the launcher
        (the parent process at construction) and it has exited, or None."""
        if self.received is not None:
            return self.received
        if self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            return LAUNCHER_EXITED
        return None

    def __enter__(self) -> StopRequest:
        if self.signals and threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                if signal.getsignal(signum) == signal.SIG_IGN:
                    self.ignored.append(signum.name)
                else:
                    self._previous[signum] = signal.signal(signum, self._handle)
            self.active = bool(self._previous)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self.active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._received_at = signal.Signals(signum).name, time.monotonic()
            return
        if time.monotonic() - self._received_at < self.repeat_window:
            return
        previous = self._previous.get(signal.Signals(signum), signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.raise_signal(signum)


def ignore_signals(names: Sequence[str], worker_id: int | None = None) -> None:
    """Ignore these signals in this process. As a DataLoader's ``worker_init_fn`` (through
    ``functools.partial(ignore_signals, names)``, which receives the worker's id): workers share the
    terminal's Ctrl-C and a scheduler's ``SIGTERM`` with the trainer, but must keep serving it
    until it stops — a worker killed by the signal would fail the trainer at once."""
    for name in names:
        signal.signal(signal_number(name), signal.SIG_IGN)
