"""The command lines, two ways: the repository's scripts (``train_ddpm.py``, ``eval_metrics.py``,
``sample_ddpm.py``), and the commands that installing the package puts on the ``PATH`` for those
who install it without a clone (``ddpm-train``, ``ddpm-eval``, ``ddpm-sample``; ``accelerate
launch $(which ddpm-train) ...`` launches the first). Both run the same functions, and the messages
name the program as it was started.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: Each installed command and the repository script it stands for.
INSTALLED_COMMANDS = {"ddpm-train": "train_ddpm.py", "ddpm-eval": "eval_metrics.py", "ddpm-sample": "sample_ddpm.py"}


def started_by_installed_command() -> str | None:
    """The installed command (``ddpm-train``, …) that started this process, or None."""
    started_as = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return started_as if started_as in INSTALLED_COMMANDS else None


def program_name(script: str) -> str:
    """The name ``script``'s program was started by, for its usage line, its errors and the
    commands it suggests: the installed command (``ddpm-train``) when that started this process,
    else ``script`` (``train_ddpm.py``: run as a script, or called from Python)."""
    command = started_by_installed_command()
    return command if command is not None and INSTALLED_COMMANDS[command] == script else script


def invocation(script: str) -> str:
    """How to run ``script``'s program the way this one was started: ``python eval_metrics.py``
    from a clone, ``ddpm-eval`` where the installed commands are in use."""
    if started_by_installed_command() is not None:
        return next(command for command, name in INSTALLED_COMMANDS.items() if name == script)
    return f"python {script}"


# Each command parses and checks its options before it imports the module that does the work, so
# `--help`, a misspelt option or a bad value is answered without the seconds torch and diffusers take
# to load (0.06 s for --help on the 2-core reference CPU, 0.7 s for a value the checks refuse).


def train() -> None:
    """``train_ddpm.py`` / ``ddpm-train``: exits with :func:`~ddpm_pipeline.training.exit_status`."""
    from .console import keep_stderr_writable, run_command
    from .training_config import TrainingConfig

    keep_stderr_writable()  # a launcher that relays stderr may die first: the run still checkpoints
    config = TrainingConfig.from_args()
    from .training import exit_status, main

    sys.exit(exit_status(run_command(lambda: main(config=config), program_name("train_ddpm.py"))))


def evaluate() -> None:
    """``eval_metrics.py`` / ``ddpm-eval``."""
    from .console import run_command
    from .evaluation_config import EvaluationConfig

    config = EvaluationConfig.from_args()
    from .evaluation import main

    run_command(lambda: main(config=config), program_name("eval_metrics.py"))


def sample() -> None:
    """``sample_ddpm.py`` / ``ddpm-sample``."""
    from .console import run_command
    from .sample_config import SampleConfig

    config = SampleConfig.from_args()
    from .generation import main

    run_command(lambda: main(config=config), program_name("sample_ddpm.py"))
