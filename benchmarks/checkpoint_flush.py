"""What flushing a checkpoint (or a pipeline) to the disk before it is named costs a training run.

    python benchmarks/checkpoint_flush.py --model ddpm-cifar10-32 [--writes 6] [--what pipeline] [--output results.jsonl]

``write_checkpoint`` fsyncs every file of a checkpoint under its temporary name, then the run
folder after the rename (:func:`~ddpm_pipeline.atomic.flush_to_disk`), so that a power cut cannot
leave ``checkpoint-N`` named but empty. This writes the checkpoint a run of ``--model`` writes (its
weights, AdamW's state after one step, the EMA copy and the random states, through Accelerate's
``save_state``) ``--writes`` times, alternately without and with the flush, each after ``os.sync()``
so that none pays for the one before, and prints the median seconds of each. Without the flush the
data still goes to the disk, later, by the kernel; the difference is what the run waits for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

import ddpm_pipeline.checkpointing as checkpointing
from ddpm_pipeline.atomic import atomic_path
from ddpm_pipeline.pipeline_ddpm_target import DDPMTargetPipeline
from ddpm_pipeline.scheduling_ddpm_target import DDPMTargetScheduler
from ddpm_pipeline.unet import DDPMUNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import append_json_lines  # noqa: E402


def write_checkpoint(output_dir: Path, step: int, flushing: bool, accelerator: Accelerator, unet: DDPMUNet) -> Path:
    """``checkpoint-<step>`` as a run writes it, flushed or not; the one before it pruned."""
    flush = checkpointing.flush_to_disk
    checkpointing.flush_to_disk = flush if flushing else (lambda path: None)
    try:
        written = checkpointing.write_checkpoint(output_dir, step, accelerator.save_state, {"global_step": step})
    finally:
        checkpointing.flush_to_disk = flush
    checkpointing.prune_checkpoints(output_dir, 1)
    return written


def write_pipeline(output_dir: Path, step: int, flushing: bool, accelerator: Accelerator, unet: DDPMUNet) -> Path:
    """The network's pipeline, written as a run writes a snapshot (``atomic_path``), flushed or not."""
    pipeline = DDPMTargetPipeline(unet=accelerator.unwrap_model(unet), scheduler=DDPMTargetScheduler())
    with atomic_path(output_dir / f"pipeline-{step}", flush=flushing) as staging:
        pipeline.save_pretrained(staging)
    return output_dir / f"pipeline-{step}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ddpm-small-28", help="the UNet preset whose checkpoint is written")
    parser.add_argument("--writes", type=int, default=6, help="checkpoints written, half of them flushed (even: 2 or more)")
    parser.add_argument("--what", choices=["checkpoint", "pipeline"], default="checkpoint", help="what is written")
    parser.add_argument("--output_dir", type=Path, help="where to write them (default: a temporary folder, deleted)")
    parser.add_argument("--output", type=Path, help="append the result as a JSON line")
    args = parser.parse_args(argv)
    if args.writes < 2 or args.writes % 2:
        parser.error("--writes must be even and at least 2: as many writes with the flush as without")
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    unet = DDPMUNet.from_preset(args.model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMAModel(unet.parameters())
    accelerator.register_for_checkpointing(ema)
    size, channels = unet.config.sample_size, unet.config.in_channels
    unet(torch.randn(1, channels, size, size), torch.tensor([1])).sample.mean().backward()
    optimizer.step()  # AdamW's moments exist, as in a run's checkpoint
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or Path(scratch)
        write = write_pipeline if args.what == "pipeline" else write_checkpoint
        for step in range(1, args.writes + 1):
            flushing = step % 2 == 0
            os.sync()
            started = time.perf_counter()
            written = write(output_dir, step, flushing, accelerator, unet)
            seconds["with" if flushing else "without"].append(time.perf_counter() - started)
        size_bytes = sum(path.stat().st_size for path in written.rglob("*") if path.is_file())
    result = {"model": args.model, "written": args.what, "mib": round(size_bytes / 2**20, 1), "writes": args.writes,
              **{f"{name}_flush_s": round(statistics.median(times), 3) for name, times in seconds.items()}}  # fmt: skip
    print(f"{args.model}: a {result['mib']} MiB {args.what} written in {result['without_flush_s']} s without the "
          f"flush, {result['with_flush_s']} s with it (medians of {args.writes // 2} each)")
    append_json_lines(args.output, [result])
    return result


if __name__ == "__main__":
    main()
