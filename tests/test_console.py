"""The command lines' console: bad input is reported in one line, and a run outlives its console."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_pipeline.console import TRACEBACK_VARIABLE, OutlivesItsReader, keep_stderr_writable, run_command
from ddpm_pipeline.generation import SampleConfig
from ddpm_pipeline.training_config import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]


def test_bad_input_is_one_line_and_other_errors_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_VARIABLE, raising=False)
    with pytest.raises(SystemExit) as stopped:
        run_command(lambda: TrainingConfig(checkpoint_on_signals=["STOP"]), "train_ddpm.py")
    assert stopped.value.code == 1 and stopped.value.__suppress_context__
    assert capsys.readouterr().err == (
        "train_ddpm.py: error: Bad training options:\n  --checkpoint_on_signals: SIGSTOP cannot be caught by any "
        "process, so no checkpoint can be written on it; use SIGTERM, SIGINT, SIGUSR1.\n"
    )
    assert run_command(lambda: 7, "x") == 7
    with pytest.raises(ValueError, match="invalid literal"):  # raised by Python, not by this package: a traceback
        run_command(lambda: int("seven"), "x")

    def wrong_call():
        TrainingConfig(no_such_option=1)

    with pytest.raises(TypeError):  # a programming error, not bad input
        run_command(wrong_call, "x")
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    with pytest.raises(ValueError, match="SIGSTOP cannot be caught"):
        run_command(lambda: TrainingConfig(checkpoint_on_signals=["STOP"]), "train_ddpm.py")


def test_the_commands_report_bad_input_without_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop(TRACEBACK_VARIABLE, None)
    # the installed command (train_ddpm.py runs the same function: test_training's launches run it)
    train = subprocess.run([str(Path(sys.executable).parent / "ddpm-train"), "--model", "ddpm-small-28", "--resolution", "30",
                            "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, env=env)  # fmt: skip
    assert train.returncode == 1 and "Traceback" not in train.stderr, train.stderr
    assert "ddpm-train: error: The UNet configuration cannot train:\n  resolution 30 is not divisible by 4" in train.stderr
    evaluate = subprocess.run([sys.executable, str(ROOT / "eval_metrics.py"), "--model", str(tmp_path / "missing"),
                               "--metrics", "bpd", "--output", str(tmp_path / "results.json")],
                              capture_output=True, text=True, env=env)  # fmt: skip
    assert evaluate.returncode == 1 and "Traceback" not in evaluate.stderr, evaluate.stderr
    assert f"eval_metrics.py: error: --model {tmp_path / 'missing'} is not a folder, nor a Hub repo id" in evaluate.stderr


def test_installing_the_package_puts_the_three_programs_on_the_path(monkeypatch, capsys):
    """ddpm-train, ddpm-eval and ddpm-sample run what the repository's scripts run, and name
    themselves (usage, errors, the commands suggested next) as they were started."""
    from importlib.metadata import entry_points

    from ddpm_pipeline import commands

    installed = {point.name: point.value for point in entry_points(group="console_scripts") if point.name.startswith("ddpm-")}
    assert installed == {"ddpm-train": "ddpm_pipeline.commands:train", "ddpm-eval": "ddpm_pipeline.commands:evaluate",
                         "ddpm-sample": "ddpm_pipeline.commands:sample"}  # fmt: skip
    assert all((Path(sys.executable).parent / name).is_file() for name in installed)  # run in the test above
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/ddpm-sample"])
    with pytest.raises(SystemExit):
        SampleConfig.from_args(["--help"])
    assert capsys.readouterr().out.startswith("usage: ddpm-sample ")
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/ddpm-train"])
    assert commands.program_name("train_ddpm.py") == "ddpm-train" and commands.invocation("eval_metrics.py") == "ddpm-eval"
    assert TrainingConfig.argument_parser().prog == "ddpm-train"
    monkeypatch.setattr(sys, "argv", ["train_ddpm.py"])
    assert commands.program_name("train_ddpm.py") == "train_ddpm.py"
    assert commands.invocation("eval_metrics.py") == "python eval_metrics.py"


def test_stderr_outlives_its_reader(tmp_path, monkeypatch):
    """A launcher that relays stderr through a pipe and dies: writing goes on, to os.devnull, for
    the wrapper and for every other writer of that descriptor, instead of raising BrokenPipeError."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    console = OutlivesItsReader(stream)
    console.write("read\n")
    console.flush()
    assert os.read(read_end, 100) == b"read\n" and not console.reader_gone
    os.close(read_end)  # the reader dies
    console.write("nobody reads this\n" * 1000)
    console.flush()
    assert console.reader_gone
    devnull = os.stat(os.devnull)
    assert (os.fstat(write_end).st_dev, os.fstat(write_end).st_ino) == (devnull.st_dev, devnull.st_ino)
    print("the stream itself writes on", file=stream, flush=True)
    assert console.fileno() == write_end  # the rest is the stream's own
    stream.close()
    # installed once, over a stream with a descriptor; a test's or notebook's capture is left alone
    with (tmp_path / "stderr.txt").open("w") as file:
        monkeypatch.setattr(sys, "stderr", file)
        keep_stderr_writable()
        keep_stderr_writable()
        assert isinstance(sys.stderr, OutlivesItsReader) and sys.stderr._stream is file
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    keep_stderr_writable()
    assert sys.stderr is captured
