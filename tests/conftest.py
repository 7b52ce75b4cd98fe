"""Shared test settings: offline, deterministic, small."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from ddpm_pipeline.speed import cpu_threads_per_process  # noqa: E402

diffusers_logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/{name}.py`` loaded afresh as the module ``name`` (registered in `sys.modules`,
    where its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def public_config(config) -> dict:
    """A config without diffusers' private bookkeeping keys (``_class_name``, ``_use_default_values``…)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so the next in-process run builds its own (as a
    separate launch would)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Each test that trains in-process starts and ends with a fresh Accelerate state."""
    reset_accelerate()
    yield
    reset_accelerate()


def two_process_launch() -> list[str]:
    """``accelerate launch`` of two CPU processes (gloo), on a port that is free now rather than the
    default 29500, so that two test runs on one machine (or anything else on 29500) do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no"]  # fmt: skip


@contextmanager
def torch_threads(count: int | None = None) -> Iterator[None]:
    """Run the block with torch on ``count`` threads (``None``: as it is), then give torch back the
    thread count it had, whatever the block set."""
    before = torch.get_num_threads()
    try:
        if count is not None:
            torch.set_num_threads(count)
        yield
    finally:
        torch.set_num_threads(before)


def launched_cpu_threads() -> int:
    """The threads each process of :func:`two_process_launch` computes with: the launcher leaves a
    script one (``OMP_NUM_THREADS=1``), and sampling and training started by it take their share of
    the cores back (:func:`~ddpm_pipeline.speed.cpu_threads_per_process`). float32 convolutions sum
    in another order on another number of threads, so a single process compared with them to the
    bit has to compute on as many."""
    return cpu_threads_per_process(2)


def run_to_success(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a command that must succeed; when it fails, the test fails with the end
    of its output (a bare ``CalledProcessError`` shows neither stdout nor stderr)."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))[:300]} exited with status {result.returncode}\n"
                    f"--- stdout (end) ---\n{result.stdout[-2000:]}\n--- stderr (end) ---\n{result.stderr[-6000:]}")  # fmt: skip
    return result



def hub_cache_repo(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder`` out in ``cache`` as huggingface_hub caches the main revision of the model repo
    ``repo_id`` (``models--owner--name/refs/main`` naming a ``snapshots/<commit>`` copy), so that the
    Hub code paths run offline; return the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``os.fsync`` is called on from now on (each opened by ``os.open``), in order: a list
    that fills as the test runs; the fsyncs still happen."""
    opened: dict[int, str] = {}
    synced: list[str] = []
    original_open, original_fsync = os.open, os.fsync

    def recording_open(path, flags, *args, **kwargs):
        descriptor = original_open(path, flags, *args, **kwargs)
        opened[descriptor] = str(path)
        return descriptor

    def recording_fsync(descriptor):
        synced.append(opened[descriptor])
        original_fsync(descriptor)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced
