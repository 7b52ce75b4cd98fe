"""Sampling throughput: DDPMTargetPipeline against stock diffusers.DDPMPipeline, in one process.

    python benchmarks/bench_sample.py --device cpu --model ddpm-small-28 --batch_size 64 --num_inference_steps 20
    python benchmarks/bench_sample.py --device cuda --model ddpm-cifar10-32 --batch_size 256 1024 --num_inference_steps 1000 [--profile]
        [--stock_batch_size 256]    # stock only at 256: its 1000 steps at batch 1024 take minutes

Both pipelines hold the same UNet weights (randomly initialised: speed does not depend on them)
and sample the same batch with the same number of steps, each drawing its noise from a generator
on the device. Stock runs its UNet in fp16 on CUDA (as diffusers users do with
``torch_dtype=torch.float16``); ours runs :meth:`~ddpm_pipeline.DDPMTargetPipeline.enable_fast_sampling`
with its defaults (on CUDA: bf16, channels_last, torch.compile with CUDA graphs) unless told
otherwise. For each batch size, prints UNet evaluations per second (batch × steps / seconds) and
images per second for each, their ratio (the headline ``speedup``: at the best batch size where
both ran), the hours 50,000 samples take at that rate, and the model FLOP utilization (UNet
evals/s × forward FLOPs ÷ the measured matmul peak, :mod:`measure`).
``--profile`` adds, at the best batch size, each side's top kernels per sampling step and how
busy the device is (the rest is launch overhead and host work).

``--variant NAME=OPTIONS`` (repeatable) adds another configuration of ours (``--dtype``,
``--[no-]channels_last``, ``--[no-]compile``, ``--compile_mode``), timed beside the others at every
batch size, e.g. ``--variant 'eager=--no-compile' --variant 'no-graphs=--compile_mode default'``
for what compiling and CUDA graphs bring. A contender that fails is recorded under ``failures``
with its error, and the rest are measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet
from ddpm_pipeline.speed import device_description, is_channels_last, is_compiled

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    Contenders,
    append_json_lines,
    forward_flops_per_image,
    matmul_peak_flops,
    parse_variants,
    profile_calls,
    synchronize,
)
from stock_recipe import use_torch_default_tf32  # noqa: E402  (sibling files: the benchmarks run as scripts)


def _to(unet: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move (and cast only when needed: diffusers warns about casting with ``to``)."""
    unet = unet.to(device)
    return unet if dtype == torch.float32 else unet.to(dtype=dtype)


def fast_path_options() -> argparse.ArgumentParser:
    """The options of one configuration of ours (``enable_fast_sampling``'s), for the command line
    and for each ``--variant``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="our UNet's dtype")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None, help="ours (default: on for CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="ours (default: on for CUDA)")
    parser.add_argument("--compile_mode", default=None, help="ours (default: reduce-overhead, i.e. CUDA graphs, on CUDA; "
                        "'default' compiles without them)")  # fmt: skip
    return parser


def our_pipeline(unet: DDPMUNet, device: torch.device, options: argparse.Namespace) -> DDPMTargetPipeline:
    """Ours: a copy of ``unet`` on ``device`` with :meth:`DDPMTargetPipeline.enable_fast_sampling`."""
    copy = DDPMUNet.from_config(unet.config)
    copy.load_state_dict(unet.state_dict())
    pipeline = DDPMTargetPipeline(copy.eval().to(device), DDPMTargetScheduler())
    return pipeline.enable_fast_sampling(dtype=options.dtype, channels_last=options.channels_last,
                                         compile=options.compile, compile_mode=options.compile_mode)  # fmt: skip


def describe(pipeline: DDPMTargetPipeline) -> dict:
    """What a configuration of ours turned into: its UNet's dtype, memory layout, and whether it is compiled."""
    unet = pipeline.unet
    return {"dtype": str(unet.dtype).removeprefix("torch."), "channels_last": is_channels_last(unet),
            "compiled": is_compiled(unet)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[fast_path_options()])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ddpm-cifar10-32")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[256], help="one or more; the best is reported")
    parser.add_argument("--stock_batch_size", type=int, nargs="+",
                        help="the batch sizes stock is timed at too (default: all of --batch_size); ours is timed at every one, "
                             "so a short GPU call can time stock at the batch the target names and ours at larger ones")  # fmt: skip
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--variant", action="append", metavar="NAME=OPTIONS", help="another configuration of ours")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (alternating); the median is reported")
    parser.add_argument("--profile", action="store_true", help="also print each side's top kernels at the best batch size")
    parser.add_argument("--profile_steps", type=int, default=20, help="sampling steps profiled (one pipeline call each)")
    parser.add_argument("--output", type=Path, help="append the result as a JSON line")
    args = parser.parse_args(argv)
    stock_batches = set(args.stock_batch_size or args.batch_size)
    if not stock_batches <= set(args.batch_size):
        parser.error(f"--stock_batch_size {sorted(stock_batches - set(args.batch_size))} is not among --batch_size {args.batch_size}.")
    try:
        variant_options = parse_variants(args.variant)
        variants = {name: fast_path_options().parse_args(options) for name, options in variant_options.items()}
    except ValueError as error:
        parser.error(str(error))
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = DDPMUNet.from_preset(args.model).eval()
    stock_dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipelines, tf32 = Contenders(), {}

    def build(name: str, options: argparse.Namespace) -> DDPMTargetPipeline:
        pipeline = our_pipeline(unet, device, options)
        tf32[name] = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # as enable_fast_sampling set them
        return pipeline

    for name, options in {"ours": args, **variants}.items():
        pipelines.add(name, lambda name=name, options=options: build(name, options))
    stock_unet = DDPMUNet.from_preset(args.model)
    stock_unet.load_state_dict(unet.state_dict())
    pipelines.add("stock", lambda: DDPMPipeline(_to(stock_unet, device, stock_dtype).eval(), DDPMScheduler()))
    for pipeline in pipelines.values():
        pipeline.set_progress_bar_config(disable=True)
    settings = {name: describe(pipeline) for name, pipeline in pipelines.items() if name != "stock"}

    def run(name: str, batch_size: int, steps: int) -> float:
        if device.type == "cuda" and name != "stock":  # what enable_fast_sampling chose
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32[name]
        elif device.type == "cuda":
            use_torch_default_tf32()
        synchronize(device)
        start = time.perf_counter()
        pipelines[name](batch_size=batch_size, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0),
                        output_type="np")  # fmt: skip
        synchronize(device)
        return time.perf_counter() - start

    peak, peak_dtype = matmul_peak_flops(device)
    flops = forward_flops_per_image(args.model)
    result = {
        "device": device_description(device),
        "model": args.model,
        "num_inference_steps": args.num_inference_steps,
        "dtype_ours": settings["ours"]["dtype"] if "ours" in settings else None,
        "dtype_stock": str(stock_dtype).removeprefix("torch."),
        "channels_last_ours": settings["ours"]["channels_last"] if "ours" in settings else None,
        "torch": torch.__version__,
        "forward_gflop_per_image": flops / 1e9,
        "matmul_peak_tflops": peak / 1e12,
        "matmul_peak_dtype": peak_dtype,
        "batches": {},
    }
    if variants:
        result["variants"] = {name: {"options": options, "settings": settings.get(name)} for name, options in variant_options.items()}
    print(f"{result['device']}, {args.model}, {args.num_inference_steps} steps; ours: {settings.get('ours')}")

    def timed_at(batch_size: int) -> list[str]:
        """The contenders (still standing) timed at ``batch_size``: stock only at ``--stock_batch_size``."""
        return [name for name in pipelines if name != "stock" or batch_size in stock_batches]

    for batch_size in args.batch_size:
        for name in timed_at(batch_size):
            pipelines.attempt(name, lambda name=name, batch_size=batch_size: run(name, batch_size, 3))  # compiles / captures for this shape
        seconds = {name: [] for name in timed_at(batch_size)}
        for _ in range(args.repeats):
            for name in timed_at(batch_size):
                elapsed = pipelines.attempt(name, lambda name=name, batch_size=batch_size: run(name, batch_size, args.num_inference_steps))
                if elapsed is not None:
                    seconds[name].append(elapsed)
        entry = {}
        print(f"  batch {batch_size}:")
        for name in timed_at(batch_size):
            median = statistics.median(seconds[name])
            entry[f"{name}_unet_evals_per_s"] = batch_size * args.num_inference_steps / median
            entry[f"{name}_images_per_s"] = batch_size / median
            entry[f"{name}_hours_for_50k"] = 50000 / (batch_size / median) / 3600
            entry[f"{name}_mfu"] = entry[f"{name}_unet_evals_per_s"] * flops / peak
        for name in timed_at(batch_size):
            if "stock_unet_evals_per_s" in entry and name != "stock":
                entry[f"{name}_speedup"] = entry[f"{name}_unet_evals_per_s"] / entry["stock_unet_evals_per_s"]
            ratio = f"  {entry[f'{name}_speedup']:.2f}x stock" if f"{name}_speedup" in entry else ""
            print(f"    {name:9s} {entry[f'{name}_unet_evals_per_s']:10.1f} UNet evals/s  {entry[f'{name}_images_per_s']:8.2f} img/s  "
                  f"50k samples: {entry[f'{name}_hours_for_50k']:.2f} h  MFU {entry[f'{name}_mfu']:.1%}{ratio}")  # fmt: skip
        entry["speedup"] = entry.get("ours_speedup")
        result["batches"][str(batch_size)] = entry
    measured = [b for b in result["batches"] if "ours_unet_evals_per_s" in result["batches"][b]]
    if measured:
        best = max(measured, key=lambda b: result["batches"][b]["ours_unet_evals_per_s"])
        result["best_batch_size"] = int(best)
        result.update(result["batches"][best])
        compared = [b for b in measured if result["batches"][b].get("speedup") is not None]
        if compared:  # ours against stock at the same batch: the best such batch, when stock skipped ours' best
            same = max(compared, key=lambda b: result["batches"][b]["ours_unet_evals_per_s"])
            result["speedup"], result["speedup_batch_size"] = result["batches"][same]["speedup"], int(same)
        if args.profile and "stock" in pipelines:
            steps = min(args.profile_steps, args.num_inference_steps)
            print(f"  profile: batch {best}, one call of {steps} steps each; times per sampling step")
            calls = {name: (lambda name=name: run(name, int(best), steps)) for name in ("ours", "stock")}
            profiled = pipelines.attempt("profile", lambda: profile_calls(calls, device, unit="step", units_per_call=steps, repeats=1))
            if profiled is not None:
                result["profile"] = profiled
    if pipelines.failures:
        result["failures"] = pipelines.failures
        for name, failure in pipelines.failures.items():
            print(f"  {name:9s} FAILED: {failure}")
    print(f"  MFU = UNet evals/s × {flops / 1e9:.3g} GFLOP ÷ the measured {peak_dtype} matmul peak, {peak / 1e12:.3g} TFLOP/s")
    append_json_lines(args.output, [result])
    return result


if __name__ == "__main__":
    main()
