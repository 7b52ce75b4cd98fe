"""What a learned-variance model learned, per timestep: its variance's place between β̃_t and β_t,
and the bound's term L_t with that variance against the same network with either fixed variance.

    python benchmarks/learned_variance_profile.py --model runs/learnedvar/learned --output docs/learned_variance.png

On images of the bundled test split (quantized to the 256 levels), at log-spaced timesteps, with
one draw of ``x_t`` per image and timestep, shared by the three variances, so that the three
curves differ by the variance alone: ``v`` from the network, ``v = -1`` (``fixed_small``, β̃_t)
and ``v = +1`` (``fixed_large``, β_t). Prints and writes (``--json``) each timestep's numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddpm_pipeline import DDPMTargetPipeline  # noqa: E402
from ddpm_pipeline.data import bundled_images  # noqa: E402
from ddpm_pipeline.likelihood import quantize, timestep_bpd  # noqa: E402

VARIANCES = {"learned": None, "fixed_small (β̃)": -1.0, "fixed_large (β)": 1.0}


@torch.no_grad()
def profile(model: str, num_images: int, num_timesteps: int, seed: int) -> list[dict]:
    """Per timestep: the mean and 10/90% quantiles of f = (v+1)/2 over pixels and images, and the
    mean L_t in bits/dim under each variance."""
    pipe = DDPMTargetPipeline.from_pretrained(model)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    if not scheduler.learns_variance:
        raise SystemExit(f"{model} has variance_type {scheduler.config.variance_type!r}: give a learned_range model.")
    x0 = quantize(bundled_images(num_images, unet.config.sample_size))
    T = scheduler.config.num_train_timesteps
    grid = np.unique(np.round(np.geomspace(1, T, num_timesteps)).astype(int) - 1)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in grid.tolist():
        timesteps = torch.full((len(x0),), t, dtype=torch.long)
        noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), timesteps)
        output = unet(noisy, timesteps).sample
        prediction, values = scheduler.split_model_output(output, noisy)
        fraction = ((values + 1) / 2).flatten()
        row = {"t": t, "f_mean": float(fraction.mean()),
               "f_q10": float(fraction.quantile(0.1)), "f_q90": float(fraction.quantile(0.9))}  # fmt: skip
        for name, fixed in VARIANCES.items():
            used = output if fixed is None else torch.cat([prediction, torch.full_like(values, fixed)], dim=1)
            row[name] = float(timestep_bpd(used, scheduler, x0, noisy, timesteps).mean())
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    t = np.array([row["t"] for row in rows]) + 1
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    left.plot(t, [row["f_mean"] for row in rows], color="C0", label="mean")
    left.fill_between(t, [row["f_q10"] for row in rows], [row["f_q90"] for row in rows], color="C0", alpha=0.25,
                      label="10–90% of pixels")  # fmt: skip
    left.set(xscale="log", xlabel="timestep t + 1", ylabel="f: log σ² = f log β_t + (1-f) log β̃_t", ylim=(-0.05, 1.05),
             title="where the learned variance sits")  # fmt: skip
    left.legend()
    base = next(iter(name for name in VARIANCES if VARIANCES[name] == -1.0))
    for name in VARIANCES:
        right.plot(t, [row[name] / row[base] for row in rows], label=name)
    right.set(xscale="log", xlabel="timestep t + 1", ylabel=f"L_t ÷ L_t with {base}",
              title="the bound's term at t (same network and x_t)")  # fmt: skip
    right.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A pipeline folder trained with --variance_type learned_range.")
    parser.add_argument("--output", type=Path, required=True, help="The PNG to write.")
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--num_timesteps", type=int, default=40, help="Log-spaced timesteps (fewer after rounding).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = profile(args.model, args.num_images, args.num_timesteps, args.seed)
    plot(rows, args.output)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()
