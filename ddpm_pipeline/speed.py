"""Fast paths for training and sampling, and the policy that picks them per device and target.

Every fast path is an option of the same code; ``None`` means *auto*: on for a CUDA device, off on
the CPU (but channels_last is on where the UNet is compiled there: :func:`resolve_channels_last`,
and fused AdamW is on there too: :func:`resolve_fused_adam`).
None of them changes the math: channels_last, fused AdamW, the device-resident data set and
``torch.compile`` compute the same loss and update as the plain step up to float rounding
(tests/test_speed.py); bf16 autocast keeps float32 master weights and a float32 loss.

The one exception is the posterior-mean (μ) target. A μ network carries ``x_0`` only through
``b_t x_0`` next to ``c_t x_t`` with ``b_t / c_t ≈ 1e-4`` at large ``t``, below the resolution of
bf16/fp16 (8/11 mantissa bits) and of TF32 (10 bits), and ``x̂_0 = (μ̂ - c_t x_t) / b_t`` magnifies
the rounding: on an H100 a μ network's images moved by 0.16 (mean abs, [0, 1] scale) in half
precision against 0.001 for ε (benchmarks/RESULTS.md). *Auto* therefore keeps μ runs in strict
float32 (no autocast, no TF32); asking for half precision with μ works but warns.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .option_values import canonical_prediction_type

logger = logging.getLogger(__name__)

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def needs_full_precision(prediction_type: str) -> bool:
    """Whether a target must be computed in strict float32 (μ: see the module docstring)."""
    return canonical_prediction_type(prediction_type) == "mu"


def auto_flag(requested: bool | None, device: torch.device | str) -> bool:
    """An on/off option: ``requested`` when given, else on for CUDA and off elsewhere."""
    if requested is not None:
        return requested
    return torch.device(device).type == "cuda"


def resolve_channels_last(requested: bool | None, device: torch.device | str, compiled: bool) -> bool:
    """NHWC weights and activations: ``requested`` when given, else on for CUDA, and on the CPU
    when the UNet is compiled. There Inductor's fused C++ GroupNorm replaces ATen's NHWC one (slow
    on the CPU) and oneDNN's convolutions skip their per-call layout reorders: compiled sampling ran
    at 1.38× eager with NHWC against 1.22× without on the 2-core reference CPU (benchmarks/RESULTS.md)."""
    if requested is None and compiled:
        return True
    return auto_flag(requested, device)


#: What bfloat16 gained on a CPU with its instructions, measured on this project's 2-core reference
#: machine (AMD EPYC, AVX512-BF16; benchmarks/RESULTS.md, 2026-12-02).
CPU_BF16_MEASURED = "on this project's 2-core reference CPU, AVX512-BF16, 1.5x training and 1.7x sampling speed"
#: What emulated half precision cost there: bfloat16 with oneDNN kept from the BF16 instructions
#: (ONEDNN_MAX_CPU_ISA=AVX512_CORE), and float16, which that CPU has no instructions for.
CPU_EMULATED_MEASURED = {
    torch.bfloat16: "on this project's reference CPU with them turned off, bfloat16 trained and sampled at 0.55x float32's speed",
    torch.float16: "on this project's reference CPU (no AMX-FP16), float16 sampled at 0.06x float32's speed",
}


def cpu_bf16_instructions() -> str | None:
    """This CPU's bfloat16 instructions as torch names them — ``"AMX"`` or ``"AVX512-BF16"``, with
    which oneDNN computes bf16 convolutions and matmuls at up to twice the float32 rate — ``""``
    for an x86 CPU without them, and ``None`` where torch cannot tell (other architectures, or a
    torch without the probes)."""
    probes = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    checks = {name: getattr(torch.cpu, probe, None) for name, probe in probes.items()}
    if platform.machine().lower() not in ("x86_64", "amd64") or None in checks.values():
        return None
    return next((name for name, check in checks.items() if check()), "")


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether this device computes bfloat16 in hardware. A CUDA device: compute capability ≥ 8.0
    (A100, RTX 30xx, H100 and later) or ROCm; ``torch.cuda.is_bf16_supported()`` says yes on older
    GPUs too (T4, V100), which only emulate it, far slower than their float16 tensor cores. The
    CPU: one with AMX or AVX512-BF16 (:func:`cpu_bf16_instructions`)."""
    if torch.device(device).type == "cpu":
        return bool(cpu_bf16_instructions())
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(torch.device(device)).major >= 8


def _auto_precision(device: torch.device | str, prediction_type: str) -> str:
    """*Auto*'s choice, for training and sampling alike: ``"no"`` (float32) on the CPU and for μ,
    else ``"bf16"`` on a GPU with bfloat16 in hardware (:func:`has_native_bf16`) and ``"fp16"``
    (with Accelerate's loss scaling when training) on one without."""
    if torch.device(device).type != "cuda" or needs_full_precision(prediction_type):
        return "no"
    return "bf16" if has_native_bf16(device) else "fp16"


#: Where ``accelerate launch --mixed_precision …`` (or the ``mixed_precision`` of its config file)
#: hands its choice to the script.
LAUNCHER_PRECISION_VARIABLE = "ACCELERATE_MIXED_PRECISION"


def accelerate_autocasts_fp16(device: torch.device | str) -> bool:
    """Whether Accelerate's ``mixed_precision="fp16"`` autocasts on ``device``: not on the CPU,
    where it silently trains in float32 (no autocast, no loss scaler)."""
    return torch.device(device).type != "cpu"


def launcher_precision(requested: str | None, launcher: str | None) -> str | None:
    """The half precision (``"fp16"``/``"bf16"``) that ``accelerate launch --mixed_precision`` (or
    its config) chose, when it decides this run's: only ``requested="auto"`` defers to it, and its
    ``"no"`` is also its default, so it decides nothing; else ``None``."""
    return launcher if requested == "auto" and launcher in HALF_DTYPES else None


def resolve_mixed_precision(
    requested: str | None, device: torch.device | str, prediction_type: str, launcher: str | None = None
) -> str | None:
    """The autocast precision of a run: ``"auto"`` → the ``launcher``'s half precision when
    ``accelerate launch --mixed_precision fp16|bf16`` (or its config) chose one (its ``"no"`` is also
    its default, so it leaves the choice to auto), else ``"bf16"`` on a CUDA device with bfloat16 in
    hardware, ``"fp16"`` on an older one, ``"no"`` on the CPU and for the μ target; ``None`` →
    Accelerate's own config; any other value as given (with a warning for half precision and μ),
    except fp16 where Accelerate ignores it (:func:`accelerate_autocasts_fp16`): refused when asked
    for, dropped with a warning when the launcher chose it."""
    if requested is None:
        return None
    if requested not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {requested!r}.")
    from_launcher = launcher_precision(requested, launcher)
    requested = from_launcher or requested
    if requested == "auto":
        return _auto_precision(device, prediction_type)
    if requested == "fp16" and not accelerate_autocasts_fp16(device):
        if from_launcher:
            warnings.warn(
                "accelerate launch's mixed_precision fp16 does nothing on the CPU (Accelerate autocasts to float16 on "
                "GPUs only): this run trains in float32. The CPU's half precision is bf16 (--mixed_precision bf16, "
                "fast on a CPU with AVX512-BF16 or AMX).",
                stacklevel=2,
            )
            return "no"
        raise ValueError(
            "--mixed_precision fp16 does nothing on the CPU: Accelerate autocasts to float16 on GPUs only, so the run "
            "would train in float32 while recording fp16. Use --mixed_precision no, or bf16 on a CPU with "
            "AVX512-BF16 or AMX (faster there)."
        )
    if requested in HALF_DTYPES and needs_full_precision(prediction_type):
        warnings.warn(
            f"mixed_precision={requested} with the μ target: half precision rounds away most of x0's signal in "
            "μ̂ at large t (see ddpm_pipeline.speed); use mixed_precision='no' for exact μ training.",
            stacklevel=2,
        )
    return requested


def resolve_sampling_dtype(requested: torch.dtype | str | None, device: torch.device | str, prediction_type: str) -> torch.dtype:
    """The UNet's dtype for sampling: ``None``/``"auto"`` → bfloat16 on CUDA (float16 on a GPU
    without bfloat16 in hardware; float32 for μ and on the CPU); a dtype or its name
    (``"bfloat16"``, ``"float16"``, ``"float32"``) as given."""
    if requested is None or requested == "auto":
        return HALF_DTYPES.get(_auto_precision(device, prediction_type), torch.float32)
    dtype = getattr(torch, requested) if isinstance(requested, str) else requested
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name, got {requested!r}.")
    if dtype in (torch.float16, torch.bfloat16) and needs_full_precision(prediction_type):
        warnings.warn(
            f"Sampling a μ model in {dtype}: half precision rounds away most of x0's signal in μ̂ at large t "
            "(see ddpm_pipeline.speed); use float32.",
            stacklevel=2,
        )
    return dtype


def cpu_precision_advice(dtype: torch.dtype, auto: bool, device: torch.device | str, prediction_type: str,
                         switch: str) -> tuple[int, str] | None:  # fmt: skip
    """What a CPU run should be told about its precision, as ``(logging level, message)``, or ``None``.

    *Auto* computes in float32 on the CPU (the same numbers on every machine); on a CPU with
    bfloat16 instructions (:func:`cpu_bf16_instructions`) an ε/x0/v run is told that ``switch``
    (the option that asks for bf16) is faster there. Half precision that an x86 CPU has no
    instructions for (bfloat16 without AVX512-BF16 or AMX, float16 without AMX-FP16) is emulated,
    slower than float32, and gets a warning. ``dtype`` is what the run resolved to."""
    if torch.device(device).type != "cpu":
        return None
    instructions = cpu_bf16_instructions()
    if dtype == torch.float32:
        if auto and instructions and not needs_full_precision(prediction_type):
            return logging.INFO, (
                f"this CPU computes bfloat16 in hardware ({instructions}): {switch} is faster here ({CPU_BF16_MEASURED}), "
                "at bfloat16's rounding; auto keeps float32 on the CPU, for the same numbers on every machine"
            )
        return None
    if dtype == torch.bfloat16 and instructions == "":
        missing = "this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so bfloat16 is emulated"
    elif dtype == torch.float16 and instructions is not None and not getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)():
        missing = "this CPU has no AMX-FP16, so float16 is likely emulated"
    else:
        return None
    return logging.WARNING, f"{missing}: {CPU_EMULATED_MEASURED[dtype]}; float32 is faster"


def set_tf32(enabled: bool) -> None:
    """Let CUDA matmuls and convolutions use TF32 tensor cores (10-bit mantissa) or forbid it."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextmanager
def strict_float32(device: torch.device | str) -> Iterator[None]:
    """No TF32 on CUDA inside the block — torch lets cuDNN convolutions use it by default — and the
    flags as they were after it. For what must be float32-exact whatever sampling or training chose:
    the variational bound (its μ means differ at 1e-4 of the state's scale) and Inception features."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Store the module's 4-D weights as NHWC (``torch.channels_last``), in place; returns it."""
    return module.to(memory_format=torch.channels_last)


def is_channels_last(module: torch.nn.Module) -> bool:
    """Whether the module stores its convolution weights as NHWC, judged by the first one whose
    layout tells (more than one input channel and a kernel over 1×1)."""
    for weight in module.parameters():
        if weight.ndim == 4 and weight.shape[1] > 1 and weight.shape[2] * weight.shape[3] > 1:
            return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return False


def inductor_cpp_compiler(system: str | None = None) -> str:
    """The C++ compiler Inductor builds its CPU kernels with on ``system`` (default: this one's
    ``sys.platform``): ``$CXX`` when set, else ``cl`` on Windows, ``clang++`` on macOS and ``g++``
    elsewhere (``torch._inductor.config.cpp.cxx``)."""
    default = {"win32": "cl", "darwin": "clang++"}.get(system or sys.platform, "g++")
    return os.environ.get("CXX", "").strip() or default


def compile_unavailable_reason(device: torch.device | str) -> str | None:
    """Why ``torch.compile``'s default backend (Inductor) cannot compile for ``device``, or ``None``
    when it can. On CUDA, Inductor writes Triton kernels: Triton must be installed and support the
    GPU (compute capability 7.0 or newer). On the CPU it writes C++, which needs a C++ compiler
    (:func:`inductor_cpp_compiler`) on the ``PATH``."""
    device = torch.device(device)
    if device.type == "cpu":
        compiler = inductor_cpp_compiler()
        if shutil.which(compiler) is None and shutil.which(compiler.split()[0]) is None:  # CXX may carry flags
            return (f"Inductor, torch.compile's backend, builds C++ on the CPU and finds no compiler {compiler!r} "
                    "(install g++ or clang++, or name one in the CXX variable)")  # fmt: skip
        return None
    if device.type != "cuda":
        return None
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # a torch without the helper: trust the import
        triton_works = importlib.util.find_spec("triton") is not None
    else:
        triton_works = has_triton()
    if triton_works:
        return None
    if importlib.util.find_spec("triton") is None:
        return "Triton, which torch.compile needs on CUDA, is not installed (pip install triton)"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"Triton does not support this GPU ({torch.cuda.get_device_name(device)}, compute capability "
            f"{major}.{minor}; torch.compile needs 7.0 or newer)")  # fmt: skip


def resolve_compile(requested: bool | None, device: torch.device | str, off_switch: str) -> bool:
    """Whether to ``torch.compile`` the UNet: ``requested`` when given, else on for CUDA (see
    :func:`auto_flag`) — unless Inductor cannot compile for the device
    (:func:`compile_unavailable_reason`): then *auto* logs why and stays eager, and an explicit
    request is refused, naming the fix (``off_switch``, e.g. ``--no-compile_unet``)."""
    wanted = auto_flag(requested, device)
    reason = compile_unavailable_reason(device) if wanted else None
    if reason is None:
        return wanted
    if requested:
        raise ValueError(f"torch.compile was asked for, but {reason}. Run without compiling ({off_switch}): "
                         "the results are the same, only slower.")  # fmt: skip
    logger.warning(f"torch.compile stays off: {reason}. Running eagerly (the same results, only slower).")
    return False


def summarize_error(error: BaseException) -> str:
    """An error in one line: its type and the first two non-empty lines of its message (Dynamo's
    first line only names the backend; the second says what failed)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {' '.join(lines[:2])}"


@contextmanager
def explain_compile_failure(off_switch: str) -> Iterator[None]:
    """Turn an error of ``torch.compile`` inside the block (Dynamo or Inductor failing on the
    UNet, at its first call or at a recompile) into one that says what failed and how to go on
    without compiling (``off_switch``); the original error stays attached as its cause."""
    try:
        yield
    except RuntimeError as error:  # Dynamo's errors are RuntimeErrors; importing torch._dynamo takes 2 s
        from torch._dynamo.exc import TorchDynamoException

        if not isinstance(error, TorchDynamoException):
            raise
        raise RuntimeError(
            f"torch.compile failed on the UNet ({summarize_error(error)}). The model and data are "
            f"fine; without compiling, which computes the same results only slower: {off_switch}."
        ) from error


def compile_module(module: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """``torch.compile`` the module in place (``nn.Module.compile``: its class, attributes and
    ``state_dict`` keys stay as they are, so saving and checkpointing are unchanged); returns it."""
    module.compile(mode=mode)
    return module


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` was compiled in place (:func:`compile_module`, ``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def resolve_fused_adam(requested: bool | None, device: torch.device | str) -> bool:
    """One fused AdamW kernel per step: ``requested`` when given, else on for CUDA and for the CPU,
    where torch (2.4 and later) has a fused, vectorized AdamW kernel too. There it replaces the
    foreach path's per-tensor loop (on the CPU, foreach ops run one tensor at a time, with bias
    corrections built per tensor): ``ddpm-small-28``'s 154 tensors took 1.1–2.8 ms per step instead
    of 4.4–8.2 ms on the 2-core reference CPU (benchmarks/RESULTS.md). Off elsewhere (e.g. MPS)."""
    if requested is not None:
        return requested
    return torch.device(device).type in ("cuda", "cpu")


def build_adamw(parameters: Iterable[torch.nn.Parameter], fused: bool, **hyperparameters: Any) -> torch.optim.AdamW:
    """AdamW, as one fused kernel per step (``fused=True``) or as multi-tensor ``foreach`` kernels.

    Both implement ``m ← β1 m + (1-β1) g``, ``v ← β2 v + (1-β2) g²``,
    ``θ ← θ(1 - lr·wd) - lr · m̂ / (√v̂ + ε)`` with bias-corrected ``m̂, v̂``; they differ only in
    float rounding, and their state dicts are interchangeable (a run may resume with the other).
    """
    if fused:
        return torch.optim.AdamW(parameters, fused=True, **hyperparameters)
    return torch.optim.AdamW(parameters, foreach=True, **hyperparameters)


def fits_on_device(num_bytes: int, device: torch.device | str, fraction: float = 0.25, processes: int = 1) -> bool:
    """Whether a tensor of ``num_bytes`` that each process keeps takes at most ``fraction`` of the
    memory it lives in: the CUDA device's (one process per device), or on the CPU the machine's,
    shared by the machine's ``processes``; false where that memory is not known (other devices,
    or no ``sysconf``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return num_bytes <= fraction * torch.cuda.get_device_properties(device).total_memory
    total = physical_memory()
    return device.type == "cpu" and total is not None and num_bytes * processes <= fraction * total


def physical_memory() -> int | None:
    """The machine's memory in bytes (``sysconf``: Linux, macOS), None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def device_description(device: torch.device | str) -> str:
    """The device in words, for reports: the GPU's name (``"NVIDIA H100 80GB HBM3"``), or
    ``"cpu (x86_64, 2 threads)"`` with the threads torch uses now."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{device.type} ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_threads_per_process(num_processes: int) -> int:
    """:func:`available_cores` shared among the local processes (``LOCAL_WORLD_SIZE`` of them when a
    launcher says so, else ``num_processes``), at least 1.

    ``accelerate launch`` sets ``OMP_NUM_THREADS=1`` unless its config says ``use_cpu`` (and
    ``torchrun`` sets it too), which would leave a CPU run on one core; training, and evaluation
    started by a launcher, set torch's thread count from this instead.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    return max(1, available_cores() // max(1, local_processes))


def default_num_workers(device: torch.device | str, num_processes: int, data_on_device: bool) -> int:
    """DataLoader workers when none are asked for: 0 on the CPU (the cores are training) and when
    the data set is on the device; else up to 8 per process on a GPU machine."""
    if torch.device(device).type != "cuda" or data_on_device:
        return 0
    return max(0, min(8, available_cores() // max(1, num_processes) - 1))
