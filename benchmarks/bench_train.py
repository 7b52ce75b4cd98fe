"""Training throughput: train_ddpm.py's own step against the stock diffusers recipe, in one process.

    python benchmarks/bench_train.py --device cpu --model ddpm-small-28 --batch_size 32
    python benchmarks/bench_train.py --device cuda --model ddpm-cifar10-32 --batch_size 128 [--profile]

Both train the same UNet configuration on the same batch, resident on the device, with AdamW,
EMA and gradient clipping at 1. *Ours* is :meth:`ddpm_pipeline.training.Trainer.training_step`
plus :meth:`~ddpm_pipeline.training.Trainer.after_optimizer_step`, built from a
:class:`~ddpm_pipeline.training_config.TrainingConfig` exactly as ``train_ddpm.py`` builds it, so
with its defaults (on CUDA: bf16 autocast, TF32, channels_last, torch.compile, fused AdamW; on the
CPU: float32, eager, fused AdamW);
any other ``train_ddpm.py`` option given here (e.g. ``--no-compile_unet``) goes to ours.
*Stock* is diffusers' ``train_unconditional.py`` recipe: ``UNet2DModel`` + ``DDPMScheduler`` +
``AdamW`` + ``EMAModel`` (no foreach) and, on CUDA, fp16 autocast with a ``GradScaler``, under
torch's default TF32 flags. The two are timed in alternating blocks and the median block is
reported; prints images/s for each and the ratio, peak memory on CUDA, and model FLOP
utilization (:mod:`measure`: against the measured bf16 matmul peak on CUDA, the float32 one on the
CPU). ``--profile`` adds each side's top kernels and how much of a step the device is busy.

On the CPU both sides run with the torch threads ours takes (every core this process may use),
unless ``--stock_threads N`` gives stock its own: ``--stock_threads 1`` is stock as diffusers'
example runs under ``accelerate launch`` on a machine whose Accelerate config is not ``use_cpu``
(the launcher sets ``OMP_NUM_THREADS=1``; ``train_ddpm.py`` resets its threads to the cores, see
:func:`ddpm_pipeline.speed.cpu_threads_per_process`). Each side's threads are set before each of
its blocks and recorded (``threads_ours``, ``threads_stock``).

``--variant NAME=OPTIONS`` (repeatable) adds another configuration of ours, timed in the same
alternating blocks, e.g. ``--variant 'eager=--no-compile_unet' --variant 'nchw=--no-channels_last'``
for what compiling and the memory layout bring. Every variant runs in the mixed precision that
ours does (one process holds one Accelerate state; run precisions in runs of their own). A
contender that fails is recorded under ``failures`` with its error, and the rest are measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from ddpm_pipeline.speed import device_description, set_tf32
from ddpm_pipeline.training import Trainer
from ddpm_pipeline.training_config import TrainingConfig
from ddpm_pipeline.unet import DDPMUNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    Contenders,
    append_json_lines,
    matmul_peak_flops,
    parse_variants,
    profile_calls,
    synchronize,
    training_flops_per_image,
)
from stock_recipe import StockRecipe  # noqa: E402  (sibling files: the benchmarks run as scripts)


def tiny_dataset(folder: Path, count: int, resolution: int, channels: int) -> Path:
    """A saved data set the Trainer can be built from (its images are not what we time)."""
    rng = np.random.default_rng(0)
    mode = "L" if channels == 1 else "RGB"
    shape = (resolution, resolution) if channels == 1 else (resolution, resolution, 3)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(count)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).save_to_disk(str(folder))
    return folder


class OurStep:
    """train_ddpm.py's step, from its own Trainer, with ``options`` (train_ddpm.py's) on top of the
    benchmark's; ``name`` names its output folder under ``workdir``."""

    def __init__(self, args: argparse.Namespace, workdir: Path, options: list[str], name: str = "ours"):
        self.trainer = Trainer(TrainingConfig.from_args(our_options(args, workdir, name) + options))
        self.threads = torch.get_num_threads()  # what the Trainer set on the CPU
        self.step_index = 0

    def describe(self) -> dict:
        trainer = self.trainer
        return {"mixed_precision": trainer.mixed_precision, "tf32": trainer.allow_tf32,
                "channels_last": trainer.channels_last, "compile": trainer.compile_unet,
                "fused_adam": trainer.fused_adam}  # fmt: skip

    def __call__(self, images: torch.Tensor) -> None:
        if images.is_cuda:
            set_tf32(self.trainer.allow_tf32)
        use_threads(self.threads)
        self.trainer.training_step(images, seed=self.step_index)
        self.trainer.after_optimizer_step()
        self.step_index += 1


class StockStep:
    """diffusers' unconditional training example, step for step (:mod:`stock_recipe`)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, threads: int):
        self.recipe = StockRecipe(DDPMUNet.preset_config(args.model), device)
        self.threads = threads

    def __call__(self, images: torch.Tensor) -> None:
        use_threads(self.threads)
        self.recipe.step(images)


def use_threads(threads: int) -> None:
    """Torch's intra-op threads for the next step (a no-op when already so)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def our_options(args: argparse.Namespace, workdir: Path, name: str) -> list[str]:
    """The train_ddpm.py options every configuration of ours shares (a data set of one batch made
    once in ``workdir``, no warm-up, the benchmark's precision), before its own."""
    config = DDPMUNet.preset_config(args.model)
    data = workdir / "data"
    if not data.exists():
        tiny_dataset(data, args.batch_size, config["sample_size"], config["in_channels"])
    return ["--model", args.model, "--dataset_path", str(data), "--train_batch_size", str(args.batch_size),
            "--output_dir", str(workdir / name), "--report_to", "none", "--max_train_steps", "1000000",
            "--lr_warmup_steps", "0", "--mixed_precision", args.mixed_precision]  # fmt: skip


def time_blocks(steps: Contenders, images: torch.Tensor, device: torch.device, block: int, blocks: int) -> dict:
    """Alternate ``block`` steps of each contender ``blocks`` times; median seconds per step, peak
    memory. A contender that fails is dropped (``steps.failures`` says why)."""
    seconds = {name: [] for name in steps}
    memory = dict.fromkeys(steps, 0)
    for _ in range(blocks):
        for name, step in list(steps.items()):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            def run_block(step=step) -> float:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(block):
                    step(images)
                synchronize(device)
                return (time.perf_counter() - start) / block

            elapsed = steps.attempt(name, run_block)
            if elapsed is None:
                continue
            seconds[name].append(elapsed)
            if device.type == "cuda":
                memory[name] = max(memory[name], torch.cuda.max_memory_allocated(device))
    return {name: (statistics.median(seconds[name]), memory[name]) for name in steps}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ddpm-cifar10-32")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"], help="ours (stock uses fp16 on CUDA)")
    parser.add_argument("--variant", action="append", metavar="NAME=OPTIONS", help="another configuration of ours (train_ddpm.py options)")
    parser.add_argument("--profile", action="store_true", help="also print each side's top kernels")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    parser.add_argument("--block", type=int, default=5, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks of each")
    parser.add_argument("--stock_threads", type=int, help="CPU: torch threads for stock (default: ours'; 1 = under `accelerate launch`)")
    parser.add_argument("--output", type=Path, help="append the result as a JSON line")
    args, args.ours = parser.parse_known_args(argv)
    try:
        variants = parse_variants(args.variant)
    except ValueError as error:
        parser.error(str(error))
    if any(option.startswith("--mixed_precision") for options in variants.values() for option in options):
        parser.error("--variant cannot change --mixed_precision: one process holds one Accelerate state. "
                     "Run each precision as a run of its own (--mixed_precision).")  # fmt: skip
    device = torch.device(args.device)
    if args.stock_threads is not None and (device.type != "cpu" or args.stock_threads < 1):
        parser.error("--stock_threads takes a positive thread count, and only with --device cpu.")
    config = DDPMUNet.preset_config(args.model)
    shape = (args.batch_size, config["in_channels"], config["sample_size"], config["sample_size"])
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(device)
    settings = {}
    with tempfile.TemporaryDirectory() as folder:
        contenders = Contenders()
        for name, options in {"ours": [], **variants}.items():
            contenders.add(name, lambda name=name, options=options: OurStep(args, Path(folder), [*args.ours, *options], name))
            if name in contenders:
                trainer = contenders[name].trainer
                if trainer.accelerator.device.type != device.type:
                    parser.error(f"Accelerate chose {trainer.accelerator.device}, not --device {device}.")
                settings[name] = contenders[name].describe()
        our_threads = contenders["ours"].threads if "ours" in contenders else torch.get_num_threads()
        stock_threads = args.stock_threads or our_threads
        contenders.add("stock", lambda: StockStep(args, device, stock_threads))
        for name, step in list(contenders.items()):
            contenders.attempt(name, lambda step=step: [step(images) for _ in range(args.warmup)])
        timed = time_blocks(contenders, images, device, args.block, args.blocks)
        profiled = None
        if args.profile and {"ours", "stock"} <= set(contenders):
            profiled = contenders.attempt("profile", lambda: profile_calls(
                {"ours": lambda: contenders["ours"](images), "stock": lambda: contenders["stock"](images)}, device, unit="step"))  # fmt: skip
    if device.type == "cpu":
        use_threads(our_threads)  # the peak (and the device's name) with every core this process may use
    peak, peak_dtype = matmul_peak_flops(device)
    flops = training_flops_per_image(args.model)
    result = {
        "device": device_description(device),
        "model": args.model,
        "batch_size": args.batch_size,
        "ours_settings": settings.get("ours"),
        "ours_extra_options": args.ours,
        "mixed_precision_ours": settings["ours"]["mixed_precision"] if "ours" in settings else None,
        "mixed_precision_stock": "fp16" if device.type == "cuda" else "no",
        "torch": torch.__version__,
    }
    if device.type == "cpu":
        result["threads_ours"] = our_threads
        result["threads_stock"] = stock_threads
    measured = {}  # in the contenders' order: ours, its variants, stock
    for name, (seconds, memory) in timed.items():
        measured[name] = {"images_per_s": args.batch_size / seconds, "steps_per_s": 1 / seconds}
        if device.type == "cuda":
            measured[name]["peak_memory_gib"] = memory / 2**30
        measured[name]["mfu"] = args.batch_size / seconds * flops / peak
    stock = measured.get("stock", {}).get("images_per_s")
    for name, row in measured.items():
        if name in variants:
            result.setdefault("variants", {})[name] = {"options": variants[name], "settings": settings[name], **row}
        else:
            result.update({f"{name}_{key}": value for key, value in row.items()})
    result["training_gflop_per_image"] = flops / 1e9
    result["matmul_peak_tflops"] = peak / 1e12
    result["matmul_peak_dtype"] = peak_dtype
    result["speedup"] = measured["ours"]["images_per_s"] / stock if stock and "ours" in measured else None
    for entry in result.get("variants", {}).values():
        entry["speedup"] = entry["images_per_s"] / stock if stock else None
    if contenders.failures:
        result["failures"] = contenders.failures
    if profiled is not None:
        result["profile"] = profiled
    threads = f"; torch threads: ours {our_threads}, stock {stock_threads}" if device.type == "cpu" else ""
    print(f"{result['device']}, {args.model}, batch {args.batch_size}; ours: {settings.get('ours')}{threads}")
    for name, row in measured.items():
        extra = f", {row['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in row else ""
        ratio = f", {row['images_per_s'] / stock:.2f}x stock" if stock and name != "stock" else ""
        print(f"  {name:7s} {row['images_per_s']:9.1f} img/s  {row['steps_per_s']:7.2f} steps/s{extra}, MFU {row['mfu']:.1%}{ratio}")
    for name, failure in contenders.failures.items():
        print(f"  {name:7s} FAILED: {failure}")
    print(f"  MFU = img/s × {flops / 1e9:.3g} GFLOP ÷ the measured {peak_dtype} matmul peak, {peak / 1e12:.3g} TFLOP/s")
    append_json_lines(args.output, [result])
    return result


if __name__ == "__main__":
    main()
