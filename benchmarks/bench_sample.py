"""Sampling throughput: DDPMTargetPipeline against stock diffusers.DDPMPipeline, in one process.

    python benchmarks/bench_sample.py --device cpu --model ddpm-small-28 --batch_size 64 --num_inference_steps 20
    python benchmarks/bench_sample.py --device cuda --model ddpm-cifar10-32 --batch_size 256 --num_inference_steps 1000

Both pipelines hold the same UNet weights (randomly initialised: speed does not depend on them)
and sample the same batch with the same number of steps; stock runs its UNet in fp16 on CUDA (as
diffusers users do with ``torch_dtype=torch.float16``), ours as ``--dtype`` says. Prints UNet
evaluations per second (batch × steps / seconds) and images per second for each, their ratio,
and the time 50,000 samples would take at that rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(unet: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move (and cast only when needed: diffusers warns about casting with ``to``)."""
    unet = unet.to(device)
    return unet if dtype == torch.float32 else unet.to(dtype=dtype)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ddpm-cifar10-32")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="our UNet's dtype")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (alternating); the median is reported")
    parser.add_argument("--output", type=Path, help="append the result as a JSON line")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = DDPMUNet.from_preset(args.model).eval()
    stock_dtype = torch.float16 if device.type == "cuda" else torch.float32
    stock_unet = DDPMUNet.from_preset(args.model)
    stock_unet.load_state_dict(unet.state_dict())
    ours = DDPMTargetPipeline(_to(unet, device, getattr(torch, args.dtype)), DDPMTargetScheduler())
    stock = DDPMPipeline(_to(stock_unet, device, stock_dtype).eval(), DDPMScheduler())
    for pipeline in (ours, stock):
        pipeline.set_progress_bar_config(disable=True)

    def run(pipeline, steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        pipeline(batch_size=args.batch_size, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
        synchronize(device)
        return time.perf_counter() - start

    run(ours, 2)
    run(stock, 2)
    seconds = {"ours": [], "stock": []}
    for _ in range(args.repeats):
        seconds["ours"].append(run(ours, args.num_inference_steps))
        seconds["stock"].append(run(stock, args.num_inference_steps))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model,
        "batch_size": args.batch_size,
        "num_inference_steps": args.num_inference_steps,
        "dtype_ours": args.dtype,
        "dtype_stock": str(stock_dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }
    for name, values in seconds.items():
        median = statistics.median(values)
        result[f"{name}_unet_evals_per_s"] = args.batch_size * args.num_inference_steps / median
        result[f"{name}_images_per_s"] = args.batch_size / median
        result[f"{name}_hours_for_50k_at_{args.num_inference_steps}_steps"] = 50000 / (args.batch_size / median) / 3600
    result["speedup"] = result["ours_unet_evals_per_s"] / result["stock_unet_evals_per_s"]
    print(f"{result['device']}, {args.model}, batch {args.batch_size}, {args.num_inference_steps} steps:")
    for name in ("ours", "stock"):
        print(f"  {name:5s} {result[f'{name}_unet_evals_per_s']:10.1f} UNet evals/s  {result[f'{name}_images_per_s']:8.2f} img/s")
    print(f"  ours / stock = {result['speedup']:.2f}x")
    if args.output:
        with args.output.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
