"""What the benchmarks share: timing, the model's FLOPs per image, the device's measured matmul
peak (what model FLOP utilization divides by), profiles and JSON-line records.

Model FLOP utilization (MFU) = images/s × FLOPs per image ÷ the peak. FLOPs are counted as 2 ×
multiply-adds. Issue 7 defines the training figure of ``ddpm-cifar10-32`` as 3 × 12.1 = 36.3 GFLOP
per image (DESIGN.md §2: forward + a backward of twice the forward); every other model's is
counted here by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no
compute), training as 3 × the counted forward. The peak is *measured*, not a datasheet number:
bf16 matmuls on CUDA (the issue's definition) and float32 matmuls on the CPU, where the benchmarks
run in float32 — so a CPU MFU near 1 means the step already runs at the speed of this machine's
best GEMM.

Both benchmarks also take ``--variant NAME=OPTIONS``: more configurations of ours, timed in the same
run (an ablation of the fast paths). A contender that fails — a compiler error on a new GPU, say —
is recorded with its error and dropped, and the others are still measured: a GPU session's call
is too dear to lose to one failure.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from ddpm_pipeline.speed import summarize_error
from ddpm_pipeline.unet import DDPMUNet

#: Training FLOPs per image fixed by issue 7 (forward + backward = 3 × 12.1 GFLOP, DESIGN.md §2).
DEFINED_TRAIN_FLOPS = {"ddpm-cifar10-32": 36.3e9}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall-clock times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops_per_image(model: str) -> float:
    """FLOPs of one UNet forward pass on one image of the preset ``model`` (2 × multiply-adds of every
    convolution, linear layer and attention matmul), counted on the meta device."""
    config = DDPMUNet.preset_config(model)
    size = config["sample_size"]
    with torch.device("meta"):
        unet = UNet2DModel(**config).eval()
        images = torch.zeros(1, config["in_channels"], size, size)
        timesteps = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(images, timesteps)
    return float(counter.get_total_flops())


def training_flops_per_image(model: str) -> float:
    """FLOPs of one training image: the issue's 36.3 GFLOP for ``ddpm-cifar10-32``, else 3 × the forward."""
    return DEFINED_TRAIN_FLOPS.get(model, 3 * forward_flops_per_image(model))


def matmul_peak_flops(device: torch.device) -> tuple[float, str]:
    """The device's measured matmul throughput in FLOP/s and its dtype: bf16 8192³ on CUDA, float32
    2048³ on the CPU (the best of five timings of 5 products each, after two warm-up products)."""
    dtype, size = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 2048)
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * size**3 / best, str(dtype).removeprefix("torch.")


RESERVED_NAMES = ("ours", "stock")


def parse_variants(specs: list[str] | None) -> dict[str, list[str]]:
    """``--variant NAME=OPTIONS`` values → ``{NAME: OPTIONS split as a shell would}``, in order;
    a malformed, reserved or repeated name raises ``ValueError`` saying which."""
    variants: dict[str, list[str]] = {}
    for spec in specs or ():
        name, separator, options = spec.partition("=")
        if not separator or not name.strip():
            raise ValueError(f"--variant {spec!r}: write NAME=OPTIONS, e.g. --variant 'eager=--no-compile_unet'.")
        if name in RESERVED_NAMES or name in variants:
            raise ValueError(f"--variant {spec!r}: the name {name!r} is taken; give each variant a name of its own.")
        variants[name] = shlex.split(options)
    return variants


def describe_failure(error: BaseException) -> str:
    """One line for a contender's error in a benchmark's record (:func:`summarize_error`, at most 500 characters)."""
    return summarize_error(error)[:500]


class Contenders(dict):
    """The benchmark's contenders by name, and ``failures``: each dropped one's error (one line)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[str, str] = {}

    def attempt(self, name: str, work: Callable[[], object]) -> object | None:
        """Run ``work`` for contender ``name``; if it raises, record the failure, drop the contender
        (freeing what CUDA memory it held) and return ``None``."""
        try:
            return work()
        except Exception as error:  # a benchmark records any failure and goes on with the others
            self.failures[name] = describe_failure(error)
            print(f"  {name}: failed and dropped — {self.failures[name]}", flush=True)
            self.pop(name, None)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    def add(self, name: str, build: Callable[[], object]) -> None:
        """Build contender ``name`` (see :meth:`attempt`) and keep it if that worked."""
        built = self.attempt(name, build)
        if built is not None:
            self[name] = built


def append_json_lines(path: Path | None, records: list[dict]) -> None:
    """Append each record as one JSON line to ``path`` (its folder created if missing), one flushed
    write per record; nothing when no path was given."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def profile_calls(calls: dict[str, Callable[[], object]], device: torch.device, unit: str, units_per_call: int = 1,
                  repeats: int = 5, top: int = 12) -> dict:  # fmt: skip
    """Profile ``repeats`` runs of each contender's call (``units_per_call`` of ``unit`` each: one
    training step, or a sampling call of several steps): its top kernels per ``unit`` (device time on
    CUDA, CPU time otherwise), and how busy the device was — the share of the wall time spent in
    kernels, whose complement is launch overhead and host work. Prints the table and returns it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    units = repeats * units_per_call
    report = {}
    for name, call in calls.items():
        synchronize(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                call()
            synchronize(device)
        wall = time.perf_counter() - start
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        busy = sum(getattr(e, key) for e in events) / 1e6
        report[name] = {
            "wall_s": wall,
            "device_busy_s" if device.type == "cuda" else "cpu_op_s": busy,
            "top": [(e.key, getattr(e, key) / 1e3 / units, e.count / units) for e in events[:top]],
        }
        print(f"  {name}: {units} {unit}s in {wall * 1e3:.1f} ms, {'device busy' if device.type == 'cuda' else 'op time'} "
              f"{busy * 1e3:.1f} ms ({busy / wall:.0%})")  # fmt: skip
        for kernel, ms, calls_per_unit in report[name]["top"]:
            print(f"    {ms:8.2f} ms/{unit}  {calls_per_unit:7.1f}×  {kernel[:100]}")
    return report
