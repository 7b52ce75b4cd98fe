"""What flushing a checkpoint to the disk before it is named costs a training run.

    python benchmarks/checkpoint_flush.py --model ddpm-cifar10-32 [--writes 6] [--output results.jsonl]

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
from ddpm_pipeline.unet import DDPMUNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import append_json_lines  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ddpm-small-28", help="the UNet preset whose checkpoint is written")
    parser.add_argument("--writes", type=int, default=6, help="checkpoints written, half of them flushed (even: 2 or more)")
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
    flush = checkpointing.flush_to_disk
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or Path(scratch)
        try:
            for step in range(1, args.writes + 1):
                flushing = step % 2 == 0
                checkpointing.flush_to_disk = flush if flushing else (lambda path: None)
                os.sync()
                started = time.perf_counter()
                written = checkpointing.write_checkpoint(output_dir, step, accelerator.save_state, {"global_step": step})
                seconds["with" if flushing else "without"].append(time.perf_counter() - started)
                checkpointing.prune_checkpoints(output_dir, 1)
        finally:
            checkpointing.flush_to_disk = flush
        size_bytes = sum(path.stat().st_size for path in written.rglob("*") if path.is_file())
    result = {"model": args.model, "checkpoint_mib": round(size_bytes / 2**20, 1), "writes": args.writes,
              **{f"{name}_flush_s": round(statistics.median(times), 3) for name, times in seconds.items()}}  # fmt: skip
    print(f"{args.model}: a {result['checkpoint_mib']} MiB checkpoint written in {result['without_flush_s']} s without the "
          f"flush, {result['with_flush_s']} s with it (medians of {args.writes // 2} each)")
    append_json_lines(args.output, [result])
    return result


if __name__ == "__main__":
    main()
