"""The quality study's device logistics: the carry folders fit the per-call limit, and the
Inception weights' parts join back into the same file on the device (shell scripts, run here)."""

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark, run_to_success

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("pack_device_files.sh", "quality_session.sh", "carry_weights.py")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("git") is None or shutil.which("dd") is None,
    reason="needs bash, git and dd",
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A git checkout holding the two scripts, 300 kB of tracked files, fake wheels and data."""
    root = tmp_path / "project"
    (root / "benchmarks").mkdir(parents=True)
    for name in SCRIPTS:
        shutil.copy(REPO / "benchmarks" / name, root / "benchmarks" / name)
    (root / ".gitignore").write_text("/.whl/\n/.carry-?/\n/weights/\n/runs/\n/.site/\n/.data/\n")
    rng = random.Random(0)
    (root / "tree.bin").write_bytes(rng.randbytes(300_000))
    (root / ".whl").mkdir()
    (root / ".whl" / "fake-0.1-py3-none-any.whl").write_bytes(rng.randbytes(100_000))
    data = tmp_path / "data"
    data.mkdir()
    for name, size in (("train-images-idx3-ubyte.gz", 200_000), ("train-labels-idx1-ubyte.gz", 3_000), ("LICENSE", 100)):
        (data / name).write_bytes(rng.randbytes(size))
    (tmp_path / "inception.pth").write_bytes(rng.randbytes(2_500_000))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def pack(project: Path, limit: int) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        WEIGHTS=str(project.parent / "inception.pth"),
        DATA_DIR=str(project.parent / "data"),
        LIMIT_BYTES=str(limit),
        MARGIN_BYTES="65536",
        PYTHON=sys.executable,
    )
    return subprocess.run(
        ["bash", "benchmarks/pack_device_files.sh"], cwd=project, env=env, capture_output=True, text=True
    )


def session(project: Path, *parts: str) -> str:
    env = dict(os.environ, OUT=str(project.parent / "out"), PYTHON=sys.executable)
    run_to_success(["bash", "benchmarks/quality_session.sh", *parts], cwd=project, env=env)
    return (project / "runs/quality-fmnist/session.log").read_text()


def tree_bytes(project: Path) -> int:
    """What travels in every call: the tracked and untracked, not ignored, files."""
    files = [project / "tree.bin", project / ".gitignore"] + [project / "benchmarks" / name for name in SCRIPTS]
    return sum(f.stat().st_size for f in files)


def test_weights_are_split_to_fit_every_call_and_join_back(project: Path):
    limit = tree_bytes(project) + 1_200_000
    result = pack(project, limit)
    assert result.returncode == 0, result.stderr

    calls = re.findall(r"run\(carry=\[(.*?)\], command=\"bash benchmarks/quality_session.sh (.*?)\", timeout_s=600\)\s+# (\d+) bytes",
                       result.stdout)
    folders = sorted(p.name for p in project.glob(".carry-?"))
    parts = int((project / ".carry-a/inception.parts").read_text())
    # 1.2 MB of room per call: about 0.8 MB of the 2.5 MB (packed: random bytes do not shrink) in
    # call A beside the data and wheels, then 1.13 MB and the rest.
    assert parts == len(folders) == len(calls) == 3
    assert all(int(size) <= limit for _, _, size in calls)
    assert calls[0] == ('".whl", ".carry-a"', "setup", calls[0][2])
    assert [c[0] for c in calls[1:]] == [f'"{name}"' for name in folders[1:]]
    assert calls[1][1] == "carried" and calls[-1][1] == "weights floor next"
    assert "quality_session.sh next report" in result.stdout and "quality_fmnist.py collect" in result.stdout
    assert (project / ".carry-a/fashion-mnist/train-images-idx3-ubyte.gz").stat().st_size == 200_000
    packed = project.parent / "inception.pth.packed"
    assert packed.read_bytes().startswith(b"DDPMPLN1")
    assert sum((project / f / f"inception.part{i + 1}").stat().st_size for i, f in enumerate(folders)) == packed.stat().st_size

    log = session(project, "carried", "weights")
    joined = project / "weights/inception-fid-nofc.pth"
    assert sha256(joined) == sha256(project.parent / "inception.pth")
    assert f"joined {parts} parts" in log
    assert not (project / "weights/inception-fid-nofc.pth.packed").exists()


def test_packing_float32_weights_shrinks_them_exactly():
    """The byte planes of float32 numbers: the sign-and-exponent plane compresses, the rest is kept."""
    carry = load_benchmark("carry_weights")
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.05, 300_000).astype("<f4").tobytes() + b"tail!"  # a length that is no multiple of 4
    packed = carry.pack(weights)
    assert len(packed) < 0.85 * len(weights)
    assert carry.unpack(packed) == weights
    with pytest.raises(ValueError, match="damaged or cut short"):
        carry.unpack(packed[:-100])
    with pytest.raises(ValueError, match="not a file written by carry_weights.py"):
        carry.unpack(weights)


def test_a_missing_part_is_named_and_no_weights_are_written(project: Path):
    assert pack(project, tree_bytes(project) + 1_200_000).returncode == 0
    shutil.rmtree(project / ".carry-b")
    log = session(project, "weights", "floor")
    assert "part(s) 2 of" in log and "given back between calls" in log
    assert "'weights' failed" in log and "== floor" not in log  # the later parts do not run
    assert not (project / "weights/inception-fid-nofc.pth").exists()
    assert not (project / "weights/inception-fid-nofc.pth.tmp").exists()


def test_a_tree_too_large_for_the_limit_is_refused_with_the_fix(project: Path):
    result = pack(project, 400_000)
    assert result.returncode == 1
    assert "leave no room for the weights in call A" in result.stderr


def test_a_floor_kept_in_the_repository_is_not_measured_again(project: Path):
    kept = project / "benchmarks" / "quality_fmnist" / "records.jsonl"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"study": "quality_fmnist", "recipe": "real data", "fid": 2.5}\n')
    log = session(project, "floor", "nonsense")
    assert "the floor is in benchmarks/quality_fmnist/records.jsonl already" in log
    assert "unknown part nonsense" in log and "'nonsense' failed with status 2" in log


def test_next_does_not_begin_a_recipe_that_cannot_end_in_the_call(project: Path, tmp_path: Path):
    stub = tmp_path / "python"  # quality_fmnist.py's `next` answers stock; other study commands are logged
    stub.write_text(f'#!/usr/bin/env bash\nif [[ $1 == -c ]]; then exec "{sys.executable}" "$@"; fi\n'
                    f'if [[ $2 == next ]]; then echo stock; else echo "$*" >> "{tmp_path}/study.log"; fi\n')  # fmt: skip
    stub.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(stub), CALL_MINUTES="2.5")
    run = ["bash", "benchmarks/quality_session.sh", "next"]
    run_to_success(run, cwd=project, env=env)
    log = (project / "runs/quality-fmnist/session.log").read_text()
    assert "next recipe: stock" in log and "stock not started: 2 min left of the call, under FRESH_RECIPE_MINUTES=7" in log
    assert not (tmp_path / "study.log").exists()
    # one begun in an earlier call goes on however little is left
    (project / "runs/quality-fmnist/runs/stock-5min").mkdir(parents=True)
    run_to_success(run, cwd=project, env=env)
    assert (tmp_path / "study.log").read_text().startswith("benchmarks/quality_fmnist.py run stock")
