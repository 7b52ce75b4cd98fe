"""The GPU benchmarks also run on the CPU at toy scale, so they keep working between GPU sessions."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, run_to_success, torch_threads

from ddpm_pipeline.speed import cpu_threads_per_process

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]


def test_flops_per_image():
    measure = load_benchmark("measure")
    # DESIGN.md §2: 12.1 GFLOP per 32×32 forward of the DDPM CIFAR-10 network (the count here adds
    # the attention matmuls and the time embedding); its training figure is the one issue 7 fixes
    assert measure.forward_flops_per_image("ddpm-cifar10-32") == pytest.approx(12.1e9, rel=0.03)
    assert measure.training_flops_per_image("ddpm-cifar10-32") == 36.3e9
    # other models: counted, training = forward + a backward of twice the forward
    small = measure.forward_flops_per_image("ddpm-small-28")
    assert 0.3e9 < small < 0.33e9  # 1.4M parameters, mostly 3×3 convolutions at 28×28 and 14×14
    assert measure.training_flops_per_image("ddpm-small-28") == 3 * small


def test_bench_train_on_the_cpu(tmp_path):
    output = tmp_path / "train.jsonl"
    result = load_benchmark("bench_train").main(["--device", "cpu", "--model", "ddpm-tiny-16", "--batch_size", "4",
                                       "--warmup", "1", "--block", "1", "--blocks", "2", "--output", str(output),
                                       "--profile", "--channels_last"])  # fmt: skip
    assert result["ours_images_per_s"] > 0 and result["stock_images_per_s"] > 0
    # train_ddpm.py options reach our Trainer; the CPU defaults are otherwise float32, eager, fused AdamW
    assert result["ours_extra_options"] == ["--channels_last"]
    assert result["ours_settings"] == {"mixed_precision": "no", "tf32": False, "channels_last": True,
                                       "compile": False, "fused_adam": True}  # fmt: skip
    assert set(result["profile"]) == {"ours", "stock"} and result["profile"]["ours"]["top"]
    assert result["speedup"] == pytest.approx(result["ours_images_per_s"] / result["stock_images_per_s"])
    # MFU = images/s × FLOPs per image ÷ the measured float32 matmul peak on the CPU
    assert result["matmul_peak_dtype"] == "float32" and result["matmul_peak_tflops"] > 0
    for name in ("ours", "stock"):
        expected = result[f"{name}_images_per_s"] * result["training_gflop_per_image"] / (1e3 * result["matmul_peak_tflops"])
        assert result[f"{name}_mfu"] == pytest.approx(expected)
    assert json.loads(output.read_text())["model"] == "ddpm-tiny-16"


def test_bench_train_gives_stock_the_threads_accelerate_launch_would(monkeypatch):
    """`accelerate launch` leaves a script on one thread (OMP_NUM_THREADS=1) unless its config says
    use_cpu, and train_ddpm.py takes the cores back: --stock_threads 1 times stock as it runs there,
    each side with its own threads in the same run."""
    bench = load_benchmark("bench_train")
    seen = {"ours": set(), "stock": set()}
    our_step, stock_step = bench.Trainer.training_step, bench.StockRecipe.step

    def ours(self, *args, **kwargs):
        seen["ours"].add(torch.get_num_threads())
        return our_step(self, *args, **kwargs)

    def stock(self, *args, **kwargs):
        seen["stock"].add(torch.get_num_threads())
        return stock_step(self, *args, **kwargs)

    monkeypatch.setattr(bench.Trainer, "training_step", ours)
    monkeypatch.setattr(bench.StockRecipe, "step", stock)
    with torch_threads():  # bench_train sets its own
        result = bench.main(["--device", "cpu", "--model", "ddpm-tiny-16", "--batch_size", "4", "--warmup", "1",
                             "--block", "1", "--blocks", "2", "--stock_threads", "1"])  # fmt: skip
    our_threads = cpu_threads_per_process(1)
    assert result["threads_ours"] == our_threads and result["threads_stock"] == 1
    assert seen == {"ours": {our_threads}, "stock": {1}}  # every step of each, blocks alternating
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--stock_threads", "1"])


def _failing_compiler(graph, example_inputs):
    raise RuntimeError("Cannot find a working triton installation")


def test_bench_train_times_variants_and_survives_a_failing_one(tmp_path, monkeypatch):
    """An ablation in the same run; a contender whose torch.compile fails (as on a GPU without
    Triton) is recorded with its error, and the others are still measured."""
    monkeypatch.setattr("ddpm_pipeline.training.compile_module", lambda module, mode=None: module.compile(backend=_failing_compiler))
    result = load_benchmark("bench_train").main(["--device", "cpu", "--model", "ddpm-tiny-16", "--batch_size", "4", "--warmup", "1",
                                       "--block", "1", "--blocks", "2", "--variant", "nhwc=--channels_last --fused_adam",
                                       "--variant", "compiled=--compile_unet"])  # fmt: skip
    assert result["ours_settings"]["channels_last"] is False and result["ours_images_per_s"] > 0
    nhwc = result["variants"]["nhwc"]
    assert nhwc["options"] == ["--channels_last", "--fused_adam"]
    assert nhwc["settings"]["channels_last"] is True and nhwc["settings"]["fused_adam"] is True
    assert nhwc["speedup"] == pytest.approx(nhwc["images_per_s"] / result["stock_images_per_s"])
    assert set(result["variants"]) == {"nhwc"}
    assert result["failures"]["compiled"].startswith("BackendCompilerFailed: ")
    assert "working triton installation" in result["failures"]["compiled"]
    with pytest.raises(SystemExit):  # one process holds one Accelerate state
        load_benchmark("bench_train").main(["--device", "cpu", "--model", "ddpm-tiny-16", "--variant", "fp=--mixed_precision no"])
    with pytest.raises(SystemExit):
        load_benchmark("bench_train").main(["--device", "cpu", "--model", "ddpm-tiny-16", "--variant", "stock=--channels_last"])


def test_bench_sample_on_the_cpu(tmp_path):
    result = load_benchmark("bench_sample").main(["--device", "cpu", "--model", "ddpm-tiny-16", "--batch_size", "2", "3",
                                        "--num_inference_steps", "3", "--repeats", "1", "--profile"])  # fmt: skip
    assert set(result["batches"]) == {"2", "3"} and result["best_batch_size"] in (2, 3)
    assert result["ours_unet_evals_per_s"] > 0 and result["stock_unet_evals_per_s"] > 0
    assert result["dtype_ours"] == "float32" and result["channels_last_ours"] is False  # CPU defaults
    expected = result["ours_unet_evals_per_s"] * result["forward_gflop_per_image"] / (1e3 * result["matmul_peak_tflops"])
    assert result["ours_mfu"] == pytest.approx(expected)
    # the profile: one sampling call of 3 steps each, kernels per step, the UNet's convolutions among them
    assert set(result["profile"]) == {"ours", "stock"}
    assert any("convolution" in kernel for kernel, _, _ in result["profile"]["stock"]["top"])


def test_bench_sample_times_variants_and_survives_a_failing_one(monkeypatch):
    monkeypatch.setattr("ddpm_pipeline.pipeline_ddpm_target.compile_module",
                        lambda module, mode=None: module.compile(backend=_failing_compiler))  # fmt: skip
    result = load_benchmark("bench_sample").main(["--device", "cpu", "--model", "ddpm-tiny-16", "--batch_size", "2", "3",
                                        "--num_inference_steps", "2", "--repeats", "1", "--variant", "nhwc=--channels_last",
                                        "--variant", "compiled=--compile --compile_mode default"])  # fmt: skip
    assert result["variants"]["nhwc"] == {"options": ["--channels_last"],
                                          "settings": {"dtype": "float32", "channels_last": True, "compiled": False}}  # fmt: skip
    for batch in ("2", "3"):
        entry = result["batches"][batch]
        assert entry["nhwc_unet_evals_per_s"] > 0 and entry["ours_unet_evals_per_s"] > 0
        assert entry["nhwc_speedup"] == pytest.approx(entry["nhwc_unet_evals_per_s"] / entry["stock_unet_evals_per_s"])
        assert "compiled_unet_evals_per_s" not in entry
    assert result["variants"]["compiled"]["settings"]["compiled"] is True
    assert "torch.compile failed on the UNet" in result["failures"]["compiled"]
    with pytest.raises(SystemExit):
        load_benchmark("bench_sample").main(["--device", "cpu", "--variant", "eager"])  # NAME=OPTIONS


def test_winograd_convolution_is_the_same_convolution():
    """The CPU experiment of issue 7 times a real convolution: equal values and gradients."""
    import torch

    winograd = load_benchmark("winograd_cpu")
    generator = torch.Generator().manual_seed(0)
    for size in ((2, 3, 6, 6), (1, 2, 7, 5)):  # even and odd sides (the last tile is padded)
        x = torch.randn(*size, dtype=torch.float64, generator=generator, requires_grad=True)
        weight = torch.randn(4, size[1], 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
        bias = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True)
        expected = torch.nn.functional.conv2d(x, weight, bias, padding=1)
        torch.testing.assert_close(winograd.winograd_conv3x3(x, weight, bias), expected, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(winograd.winograd_conv3x3, (x, weight, bias))


def test_winograd_experiment_runs(tmp_path):
    result = load_benchmark("winograd_cpu").main(["--model", "ddpm-tiny-16", "--batch_size", "2", "--repeats", "1",
                                        "--output", str(tmp_path / "w.jsonl")])
    assert result["direct_ms"] > 0 and result["winograd_ms"] > 0 and result["winograd_matmuls_only_ms"] > 0
    assert result["max_relative_error"] < 1e-5  # float32
    assert json.loads((tmp_path / "w.jsonl").read_text())["model"] == "ddpm-tiny-16"


def test_checkpoint_flush_cost_runs(tmp_path):
    result = load_benchmark("checkpoint_flush").main(["--model", "ddpm-tiny-16", "--writes", "2", "--output_dir",
                                                      str(tmp_path / "run"), "--output", str(tmp_path / "f.jsonl")])  # fmt: skip
    assert result["with_flush_s"] > 0 and result["without_flush_s"] > 0 and result["mib"] > 1
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["checkpoint-2"]
    assert json.loads((tmp_path / "f.jsonl").read_text())["model"] == "ddpm-tiny-16"
    pipelines = load_benchmark("checkpoint_flush").main(["--model", "ddpm-tiny-16", "--writes", "2", "--what", "pipeline",
                                                         "--output_dir", str(tmp_path / "pipelines")])  # fmt: skip
    assert pipelines["written"] == "pipeline" and pipelines["with_flush_s"] > 0 and 0.5 < pipelines["mib"] < 1
    assert sorted(path.name for path in (tmp_path / "pipelines").iterdir()) == ["pipeline-1", "pipeline-2"]


def test_the_gpu_session_runs_tests_that_exist():
    """benchmarks/gpu_session.sh names the CUDA-only tests a GPU session runs; a renamed test would
    cost that session's scarce device time, so each name is checked here."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    named = re.findall(r"(tests/test_\w+\.py)::(\w+)", script)
    assert len(named) >= 6
    for path, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE), f"{path}::{name} does not exist"


def test_bench_sample_times_stock_only_at_the_batch_sizes_asked(tmp_path):
    """A short GPU call times stock at the target's batch only; the headline ratio is then taken
    where both ran, not at ours' best batch."""
    result = load_benchmark("bench_sample").main(["--device", "cpu", "--model", "ddpm-tiny-16", "--batch_size", "2", "3",
                                        "--stock_batch_size", "2", "--num_inference_steps", "2", "--repeats", "1"])  # fmt: skip
    assert "stock_unet_evals_per_s" in result["batches"]["2"] and "stock_unet_evals_per_s" not in result["batches"]["3"]
    assert result["batches"]["3"]["speedup"] is None and result["batches"]["3"]["ours_unet_evals_per_s"] > 0
    assert result["speedup_batch_size"] == 2 and result["speedup"] == result["batches"]["2"]["speedup"]
    with pytest.raises(SystemExit):
        load_benchmark("bench_sample").main(["--device", "cpu", "--batch_size", "2", "--stock_batch_size", "4"])


def _stub_gpu_session(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of gpu_session.sh whose python3 and nvidia-smi are stubs that log their arguments."""
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / ".whl").mkdir()
    (root / ".whl" / "fake-0.1-py3-none-any.whl").write_text("")
    shutil.copy(ROOT / "benchmarks" / "gpu_session.sh", root / "benchmarks" / "gpu_session.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "nvidia-smi"):
        stub = bin_dir / name
        stub.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{tmp_path}/calls.log"\n')
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    return root, env


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_the_gpu_session_fits_its_call_and_skips_what_does_not(tmp_path):
    root, env = _stub_gpu_session(tmp_path)
    run_to_success(["bash", "benchmarks/gpu_session.sh"], cwd=root, env=env)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    benchmarks = [line for line in calls if "benchmarks/" in line or "pytest" in line]
    # one call's default: training, sampling (stock only at the target's batch), then the CUDA tests
    assert ["bench_train.py" in benchmarks[0], "bench_sample.py" in benchmarks[1], "pytest" in benchmarks[2]] == [True] * 3
    assert "--batch_size 256 1024 --stock_batch_size 256" in benchmarks[1]
    session = (tmp_path / "out" / "session.txt").read_text()
    assert re.search(r"== train \(.*, at most 240s\)", session) and "call took" in session
    # a call with too little left (a second call late in the session) skips its parts and says so
    (tmp_path / "calls.log").unlink()
    env["CALL_SECONDS"] = "65"
    run_to_success(["bash", "benchmarks/gpu_session.sh", "ablation", "tests"], cwd=root, env=env)
    assert not any("pytest" in line or "bench_" in line for line in (tmp_path / "calls.log").read_text().splitlines())
    session = (tmp_path / "out" / "session.txt").read_text()
    assert re.search(r"== ablation skipped: 5\ds left of the call's 65s", session) and "== tests skipped" in session
