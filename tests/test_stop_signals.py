"""A stop signal (preemption, Ctrl-C, SLURM's warning) ends a run with a checkpoint, not a loss."""

import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate, two_process_launch
from safetensors.torch import load_file

import ddpm_pipeline.training as training_module
from ddpm_pipeline.checkpointing import list_checkpoints, read_trainer_state
from ddpm_pipeline.stop_signals import (
    DEFAULT_STOP_SIGNALS,
    StopRequest,
    ignore_signals,
    lone_process_advice,
    signal_name,
    signal_number,
)
from ddpm_pipeline.training import exit_status, main
from ddpm_pipeline.training_config import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "ddpm-tiny-16", "--resolution", "16", "--grid_inference_steps", "2", "--num_grid_images", "4",
        "--report_to", "none", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--save_images_steps", "none"]  # fmt: skip


def test_signal_names_are_read_in_every_usual_spelling_and_uncatchable_ones_refused():
    assert DEFAULT_STOP_SIGNALS == ("SIGTERM", "SIGINT", "SIGUSR1")
    for text in ("SIGTERM", "TERM", "term", "sigterm", str(int(signal.SIGTERM))):
        assert signal_name(text) == "SIGTERM"
    assert signal_number("usr1") == signal.SIGUSR1
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        signal_name("KILL")
    with pytest.raises(ValueError, match="not a signal on this platform"):
        signal_name("SIGNOPE")
    # the training option: canonical names, `none` to switch it off, bad names refused with the reason
    assert TrainingConfig.from_args(["--checkpoint_on_signals", "TERM", "usr1"]).checkpoint_on_signals == ["SIGTERM", "SIGUSR1"]
    assert TrainingConfig.from_args(["--checkpoint_on_signals", "none"]).checkpoint_on_signals == []
    assert TrainingConfig.from_args(["--checkpoint_on_signals"]).checkpoint_on_signals == []
    assert TrainingConfig().checkpoint_on_signals == list(DEFAULT_STOP_SIGNALS)
    with pytest.raises(ValueError, match="--checkpoint_on_signals: SIGSTOP cannot be caught"):
        TrainingConfig(checkpoint_on_signals=["STOP"])


def test_first_signal_is_recorded_second_acts_as_before_and_handlers_are_restored():
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    window = 0.3
    try:
        with StopRequest(["SIGUSR1", "SIGTERM"], repeat_window=window) as request:
            assert request.active and request.received is None
            os.kill(os.getpid(), signal.SIGUSR1)
            assert request.received == "SIGUSR1" and calls == []  # recorded, nothing else happened
            # at once again, or another of them: the same request delivered twice (a terminal's
            # Ctrl-C, then a launcher passing it on as SIGTERM), which changes nothing
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert request.received == "SIGUSR1" and calls == [] and request.active
            time.sleep(window)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert calls == [signal.SIGUSR1]  # a second one later went to the handler that was there before
            assert not request.active  # ... which is back, for both signals
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR1) is not request._handle
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # a second Ctrl-C raises KeyboardInterrupt, as Ctrl-C does without the handler (Python's own
    # handler, set here: a pytest started by `pytest &` from a script inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with StopRequest(["SIGINT"], repeat_window=0) as request:
                os.kill(os.getpid(), signal.SIGINT)
                assert request.received == "SIGINT"
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_ignored_on_entry_stays_ignored():
    """A shell without job control starts `command &` with SIGINT ignored (so that Ctrl-C meant for
    the foreground does not reach it); Python leaves that alone, and so does a run."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest(["SIGINT", "SIGUSR1"]) as request:
            assert request.ignored == ["SIGINT"] and request.active
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert request.received is None and request.reason() is None
            os.kill(os.getpid(), signal.SIGUSR1)  # the others are handled as usual
            assert request.received == "SIGUSR1"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        with StopRequest(["SIGINT"]) as request:
            assert request.ignored == ["SIGINT"] and not request.active
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def enter():
        with StopRequest(["SIGTERM"]) as request:
            seen["active"] = request.active

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == {"active": False}


class SignalDispositions(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.tensor([signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, signal.getsignal(signal.SIGINT) is signal.SIG_IGN])


def test_data_loader_workers_ignore_the_stop_signals():
    loader = torch.utils.data.DataLoader(SignalDispositions(), batch_size=2, num_workers=1,
                                         worker_init_fn=functools.partial(ignore_signals, ("SIGTERM", "SIGINT")))  # fmt: skip
    assert next(iter(loader)).all()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's own process is untouched


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_signal_mid_run_checkpoints_that_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, caplog):
    options = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "none", "--random_flip"]
    original, calls = training_module.Trainer.training_step, {"n": 0}

    def step_then_signal(self, images, seed):
        loss = original(self, images, seed)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning, arriving during step 3
        return loss

    monkeypatch.setattr(training_module.Trainer, "training_step", step_then_signal)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `train_ddpm.py &` run from a script
    try:
        with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
            stopped = main([*options, "--output_dir", str(tmp_path / "stopped")])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "SIGINT is ignored by this process" in caplog.text
    assert not stopped.finished and stopped.stopped_by == "SIGUSR1" and stopped.global_step == 3
    assert exit_status(stopped) == 128 + signal.SIGUSR1
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")] == ["checkpoint-3"]
    assert not (tmp_path / "stopped" / "model_index.json").exists()  # no pipeline: the run is not over
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are gone with the run
    assert read_trainer_state(tmp_path / "stopped" / "checkpoint-3")["stopped_because"] == "received SIGUSR1"
    monkeypatch.undo()
    reset_accelerate()
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        resumed = main([*options, "--output_dir", str(tmp_path / "stopped"), "--resume_from_checkpoint", "latest"])
    assert resumed.finished and resumed.stopped_by is None and resumed.global_step == 6 and exit_status(resumed) == 0
    assert "at step 3 (0.0 min trained; it had stopped: received SIGUSR1)" in caplog.text
    assert "stopped_because" not in read_trainer_state(tmp_path / "stopped" / "checkpoint-6")  # it did not stop
    reset_accelerate()
    main([*options, "--output_dir", str(tmp_path / "straight")])
    a = load_file(str(tmp_path / "stopped" / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in b)
    # without the option the signal does what it always did
    monkeypatch.setattr(training_module.Trainer, "training_step", step_then_signal)
    calls["n"] = 0
    reset_accelerate()
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.__setitem__("plain", signum))
    try:
        result = main([*options, "--checkpoint_on_signals", "none", "--output_dir", str(tmp_path / "plain")])
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.finished and calls["plain"] == signal.SIGUSR1


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"the training process ended before writing {path.name}"
        assert time.monotonic() < deadline, f"the training process never wrote {path.name}"
        time.sleep(0.2)


def test_sigterm_to_the_command_line_stops_with_a_checkpoint_and_status_143(tmp_path):
    """The real `train_ddpm.py` process, sent SIGTERM as a scheduler would: it writes the checkpoint
    of the step it was in, says how to continue, and exits with 128 + 15."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train_ddpm.py"), *TINY, "--max_train_steps", "100000",
               "--checkpointing_steps", "2", "--checkpoints_total_limit", "none", "--output_dir", str(out)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    try:
        wait_for(out / "checkpoint-2", process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:  # never leave a training process behind, whatever failed
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = list_checkpoints(out)[-1]
    step = int(last.name.split("-")[1])
    assert step > 2 and step < 100000 and (last / "trainer_state.json").is_file()
    assert f"received SIGTERM: stopped at step {step}" in stderr and "--resume_from_checkpoint latest" in stderr
    assert not (out / "model_index.json").exists() and not list(out.glob(".*tmp"))


def test_sigterm_to_a_two_process_launch_stops_every_rank_at_one_step(tmp_path):
    """`accelerate launch --multi_gpu` (torchrun's agent, gloo on the CPU) passes SIGTERM to both
    ranks; they agree on the step at a --log_every boundary, write one checkpoint with both ranks'
    random states, and the run resumes on two processes. Resumed, its launcher dies of SIGUSR1 (not
    passed on), and the ranks, without a parent, stop the same way instead of training on alone."""
    out = tmp_path / "run"
    launch = [*two_process_launch(), str(ROOT / "train_ddpm.py")]
    options = [*TINY, "--num_cpu_threads", "1", "--log_every", "3", "--checkpointing_steps", "3",
               "--checkpoints_total_limit", "none", "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([*launch, *options, "--max_train_steps", "100000"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        wait_for(out / "checkpoint-3", process)
        process.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler signals the job's main process
        _, stderr = process.communicate(timeout=300)
    finally:  # a launcher SIGKILLed here leaves ranks that stop themselves (the test below)
        process.kill()
    assert "received SIGTERM: stopped at step" in stderr, stderr[-3000:]
    last = list_checkpoints(out)[-1]
    step = int(last.name.split("-")[1])
    assert step > 3 and step % 3 == 0  # the ranks agreed at a --log_every boundary
    assert {p.name for p in last.iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"}
    # resumed on two processes; then the launcher dies of SIGUSR1, which torchrun's agent does not
    # handle: its ranks, left without a parent, agree on a step, write its checkpoint and stop
    log = tmp_path / "resumed.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([*launch, *options, "--max_train_steps", "100000", "--resume_from_checkpoint", "latest"],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)  # fmt: skip
    try:
        wait_for(out / f"checkpoint-{step + 3}", process)
        process.send_signal(signal.SIGUSR1)
        process.wait(timeout=60)
        deadline = time.monotonic() + 300
        while "has exited: stopped at step" not in log.read_text():
            assert time.monotonic() < deadline, "the ranks kept training after their launcher died"
            time.sleep(0.2)
    finally:
        process.kill()
    text = log.read_text()
    assert f"resumed from {last} at step {step}" in text
    final = list_checkpoints(out)[-1]
    assert int(final.name.split("-")[1]) > step + 3 and int(final.name.split("-")[1]) % 3 == 0
    deadline = time.monotonic() + 60
    while any(is_running(pid) for pid in processes_with(str(out))):  # both ranks end; none trains on alone
        assert time.monotonic() < deadline, "a rank kept running after writing the checkpoint"
        time.sleep(0.2)


def processes_with(marker: str, parent: int | None = None) -> list[int]:
    """The PIDs of the processes (children of ``parent``, if given) whose command line holds
    ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            if parent is not None and int((entry / "stat").read_text().split(")")[-1].split()[1]) != parent:
                continue
            if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # a process that ended while we looked
            continue
    return found


def child_with(parent: int, marker: str) -> int:
    """The PID of the one child of ``parent`` whose command line holds ``marker``."""
    found = processes_with(marker, parent)
    assert len(found) == 1, found
    return found[0]


def is_running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


SINGLE_PROCESS_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def interrupt_a_launched_run(out: Path, log: Path, interrupt, wrapper: tuple[str, ...] = (), **popen) -> int:
    """Start ``train_ddpm.py`` through a single-process `accelerate launch` (run by ``wrapper``, if
    given), its stderr to ``log``; once it has written checkpoint-2, call ``interrupt(launcher)``
    and wait until the launcher and its training process have both ended (killing whatever is left
    if the test fails). Returns the launcher's PID."""
    command = [*wrapper, *SINGLE_PROCESS_LAUNCH, str(ROOT / "train_ddpm.py"), *TINY, "--max_train_steps", "100000",
               "--checkpointing_steps", "2", "--checkpoints_total_limit", "none", "--output_dir", str(out)]  # fmt: skip
    with log.open("w") as stderr:
        launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}, **popen)  # fmt: skip
    trainer = None
    try:
        wait_for(out / "checkpoint-2", launcher)
        trainer = child_with(launcher.pid, str(out))
        interrupt(launcher)
        launcher.wait(timeout=300)
        deadline = time.monotonic() + 300
        while is_running(trainer):
            assert time.monotonic() < deadline, "the training process kept training after it was stopped"
            time.sleep(0.2)
    finally:  # never leave a training process behind, whatever failed
        launcher.kill()
        if trainer is not None and is_running(trainer):
            os.kill(trainer, signal.SIGKILL)
    return launcher.pid


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the training process through /proc")
def test_a_run_whose_launcher_was_killed_stops_with_a_checkpoint_instead_of_training_on_alone(tmp_path):
    """`accelerate launch` SIGKILLed (no signal reaches its child): the orphaned training process
    notices that its launcher has exited, writes the checkpoint of its step and ends. From
    accelerate 1.16 the launcher relays the child's stderr through a pipe, which its death breaks:
    the run writes on to nowhere rather than die of the broken pipe, and its checkpoint records why
    it stopped."""
    out, log = tmp_path / "orphaned-run", tmp_path / "train.log"
    launcher_pid = interrupt_a_launched_run(out, log, lambda launcher: launcher.send_signal(signal.SIGKILL))
    last = list_checkpoints(out)[-1]
    assert int(last.name.split("-")[1]) > 2 and not list(out.glob(".*tmp"))  # not killed mid-write
    reason = read_trainer_state(last)["stopped_because"]
    assert reason == f"the launcher that started this run (PID {launcher_pid}) has exited"
    if not launcher_relays_stderr():  # else the log went with the launcher
        assert f"{reason}: stopped at step" in log.read_text()


def launcher_relays_stderr() -> bool:
    """Whether a single-process `accelerate launch` reads its child's stderr through a pipe (1.16 on)."""
    import accelerate.commands.launch as launch

    return hasattr(launch, "CHILD_STDERR_CHUNK_SIZE")


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the training process through /proc")
def test_ctrl_c_under_accelerate_launch_stops_with_a_checkpoint(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to every process of the foreground job: the launcher and
    its training process. accelerate 1.16's launcher then sends its child SIGTERM too, right away;
    that is the same request delivered twice, not a second one, so the run still finishes its step
    and writes its checkpoint (the launcher kills it 5 s later otherwise)."""
    out, log = tmp_path / "interrupted-run", tmp_path / "train.log"
    # started as a terminal starts a job: with Ctrl-C's default action (a pytest started with `&`
    # ignores it), in a process group of its own for the terminal's Ctrl-C to go to
    with_ctrl_c = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    interrupt_a_launched_run(out, log, lambda launcher: os.killpg(launcher.pid, signal.SIGINT),
                             wrapper=(sys.executable, "-c", with_ctrl_c), start_new_session=True)  # fmt: skip
    last = list_checkpoints(out)[-1]
    assert int(last.name.split("-")[1]) > 2 and not list(out.glob(".*tmp")), log.read_text()[-3000:]
    assert read_trainer_state(last)["stopped_because"] == "received SIGINT", log.read_text()[-3000:]


@pytest.mark.parametrize(
    ("environment", "alone"),
    [
        ({}, False),  # python train_ddpm.py
        ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, False),  # accelerate launch, one process
        ({"ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1"}, True),  # --num_processes 2, simple launcher
        ({"ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False),  # --multi_gpu
        ({"MASTER_ADDR": "10.0.0.1"}, False),  # a cluster's environment, no launcher
    ],
)
def test_a_launch_that_started_one_of_several_processes_is_told_apart(monkeypatch, environment, alone):
    for name in ("ACCELERATE_DYNAMO_BACKEND", "MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    advice = lone_process_advice("train_ddpm.py")
    assert (advice is not None) == alone
    if alone:
        assert "accelerate launch --multi_gpu --num_processes N train_ddpm.py" in advice
