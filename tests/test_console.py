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


#: The imports that take seconds: none of them may load before a command line's options are good.
HEAVY_MODULES = ("torch", "diffusers", "accelerate", "torch_fidelity", "PIL")
#: Runs one command function of ddpm_pipeline.commands on the given command line in a fresh
#: interpreter, and prints its exit status and which of the heavy modules it had loaded.
_COMMAND_PROBE = f"""
import sys
from ddpm_pipeline import commands
function, *argv = sys.argv[1:]
sys.argv = [function, *argv]
try:
    getattr(commands, function)()
except SystemExit as stop:
    print("exit", stop.code)
print("loaded", *sorted(name for name in {(*HEAVY_MODULES, "datasets")} if name in sys.modules))
"""


@pytest.mark.parametrize(
    ("function", "argv", "status", "says", "loaded"),
    [
        ("train", ["--help"], 0, "usage: train_ddpm.py", ""),
        ("train", ["--learning-rate", "1e-3"], 2, "unrecognized arguments: --learning-rate", ""),
        ("train", ["--beta_schedule", "quadratic"], 2, "invalid choice: 'quadratic'", ""),
        ("train", ["--ddpm_num_steps", "100"], 2, "--ddpm_num_steps → --num_train_timesteps", ""),
        # options that argparse accepts, with values the checks refuse: the split checks read datasets'
        ("train", ["--max_train_steps", "0", "--validation_split", "5,5"], 2, "write a share with a point: 0.05",
         " datasets"),
        ("evaluate", ["--help"], 0, "usage: eval_metrics.py", ""),
        ("evaluate", ["--num_samples", "many"], 2, "invalid int value: 'many'", ""),
        ("sample", ["--help"], 0, "usage: sample_ddpm.py", ""),
        ("sample", ["--model", "m", "--bogus"], 2, "unrecognized arguments: --bogus", ""),
    ],
)
def test_the_commands_answer_help_and_bad_options_before_loading_torch_or_diffusers(function, argv, status, says, loaded):
    """``--help``, a misspelt option, a bad choice and a bad value are answered from the option
    modules alone: torch, diffusers, accelerate and torch-fidelity (seconds to import on a CPU) load
    only once the options are good, and ``datasets`` only to check the values of split options."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    probe = subprocess.run([sys.executable, "-c", _COMMAND_PROBE, function, *argv], capture_output=True, text=True,
                           env=env, cwd=ROOT)  # fmt: skip
    printed = probe.stdout.splitlines()
    assert printed[-2:] == [f"exit {status}", f"loaded{loaded}"], probe.stdout + probe.stderr
    assert says in probe.stdout + probe.stderr


def test_good_options_parse_without_loading_torch_or_diffusers():
    """Every option of the three command lines, checks included, parses without the heavy modules
    (the linear schedule's step check alone needs torch's schedule functions), and the package's
    public names load on first use."""
    probe = f"""
import sys
import ddpm_pipeline
from ddpm_pipeline.evaluation_config import EvaluationConfig
from ddpm_pipeline.sample_config import SampleConfig
from ddpm_pipeline.training_config import TrainingConfig

TrainingConfig.from_args(["--validation_split", "5%", "--prediction_type", "x0", "--variance_type", "learned_range",
                          "--timestep_sampling", "importance", "--snr_gamma", "3", "--model", "ddpm-small-32",
                          "--unet_overrides", '{{"norm_num_groups": 16}}', "--checkpoint_on_signals", "TERM", "USR1"])
EvaluationConfig.from_args(["--model", "run", "--metrics", "fid,bpd", "--bpd_held_out", "0.05", "--scheduler", "ddim"])
SampleConfig.from_args(["--model", "run", "--num_images", "8", "--sampling_dtype", "bfloat16"])
print("loaded", *sorted(name for name in {HEAVY_MODULES} if name in sys.modules))
print(ddpm_pipeline.DDPMUNet.__module__, ddpm_pipeline.ModelMixin.__module__, "DDPMTargetScheduler" in dir(ddpm_pipeline))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["loaded", "ddpm_pipeline.unet diffusers.models.modeling_utils True"]


def test_the_package_names_what_it_lacks():
    import ddpm_pipeline

    with pytest.raises(AttributeError, match="has no attribute 'DDPMUNetX'"):
        ddpm_pipeline.DDPMUNetX  # noqa: B018
    assert set(ddpm_pipeline.__all__) <= set(dir(ddpm_pipeline))
    assert all(getattr(ddpm_pipeline, name) is not None for name in ddpm_pipeline.__all__)


def test_the_option_values_are_what_their_modules_implement():
    """The light option vocabulary (``option_values``) agrees with the modules that act on it."""
    from ddpm_pipeline.option_values import SCHEDULER_CHOICES
    from ddpm_pipeline.sampling import SAMPLER_SCHEDULERS

    assert SCHEDULER_CHOICES == ("ddpm", *SAMPLER_SCHEDULERS)


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
