"""How noisy a batch's loss is with uniform and with importance-sampled timesteps, for a trained model.

    python benchmarks/timestep_sampling_profile.py --model runs/lvlb/uniform --output docs/timestep_sampling.png

For ``--num_images`` bundled images and every timestep ``t`` (or every ``--stride``-th), one draw
of ``x_t`` each, the training loss of each image (the ``loss`` of :func:`~ddpm_pipeline.diffusion_loss_terms`
with the model's ``--loss_weighting``) gives the per-timestep mean ``m_t`` and second moment
``s_t``. The importance sampler is fed the same losses, so its ``p_t`` is what training would draw
from with a history that long. Exactly, from those moments, one draw's loss estimate has

- uniform draws: ``Var = mean_t s_t - μ²``,
- importance draws (weighted by ``1/(T p_t)``): ``Var = Σ_t s_t / (T² p_t) - μ²``,

with ``μ = mean_t m_t``, the objective both estimate; a batch of ``B`` divides them by ``B``.
Prints and writes (``--json``) the summary and the per-timestep numbers, and plots ``m_t`` and
``p_t`` (PNG).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ddpm_pipeline import DDPMTargetPipeline, ImportanceTimestepSampler, diffusion_loss_terms  # noqa: E402
from ddpm_pipeline.data import bundled_images  # noqa: E402
from ddpm_pipeline.option_values import DEFAULT_IMPORTANCE_UNIFORM_PROB, DEFAULT_SNR_GAMMA, LOSS_WEIGHTINGS  # noqa: E402
from ddpm_pipeline.training_config import CONFIG_FILE_NAME, TrainingConfig  # noqa: E402


@torch.no_grad()
def per_timestep_losses(model: str, weighting: str, num_images: int, stride: int, seed: int,
                        snr_gamma: float = DEFAULT_SNR_GAMMA) -> tuple[list[int], torch.Tensor]:  # fmt: skip
    """The timesteps visited and each image's loss there, ``[timesteps, images]`` (float64)."""
    pipe = DDPMTargetPipeline.from_pretrained(model)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    x0 = bundled_images(num_images, unet.config.sample_size).expand(-1, unet.config.in_channels, -1, -1)
    generator = torch.Generator().manual_seed(seed)
    timesteps = list(range(0, scheduler.config.num_train_timesteps, stride))
    rows = []
    for t in tqdm(timesteps, desc="timesteps"):
        noise = torch.randn(x0.shape, generator=generator)
        at = torch.full((len(x0),), t, dtype=torch.long)
        terms = diffusion_loss_terms(unet, scheduler, x0, weighting, timesteps=at, noise=noise, snr_gamma=snr_gamma)
        rows.append(terms.loss.double())
    return timesteps, torch.stack(rows)


def estimator_spread(losses: torch.Tensor, uniform_prob: float, batch_size: int) -> dict:
    """The standard deviation of a batch's loss estimate under uniform and importance draws, from
    the per-timestep moments of ``losses`` (``[timesteps, images]``), and the sampler's ``p_t``."""
    count = losses.shape[0]
    sampler = ImportanceTimestepSampler(count, history=losses.shape[1], uniform_prob=uniform_prob)
    sampler.update(torch.arange(count).repeat_interleave(losses.shape[1]), losses.flatten())
    p = sampler.probabilities()
    mean, second = losses.mean(dim=1), losses.pow(2).mean(dim=1)
    objective = mean.mean()
    uniform_variance = second.mean() - objective**2
    importance_variance = (second / (count**2 * p)).sum() - objective**2
    return {
        "objective": float(objective),
        "uniform_std": math.sqrt(float(uniform_variance) / batch_size),
        "importance_std": math.sqrt(max(float(importance_variance), 0.0) / batch_size),
        "std_ratio": math.sqrt(float(uniform_variance) / max(float(importance_variance), 1e-300)),
        "mean": mean.tolist(),
        "p": p.tolist(),
    }


def plot(timesteps: list[int], summary: dict, title: str, path: Path) -> None:
    t = [step + 1 for step in timesteps]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    left.plot(t, summary["mean"], color="C0")
    left.set(xscale="log", yscale="log", xlabel="timestep t + 1", ylabel="mean loss at t", title=title)
    right.plot(t, [p * len(t) for p in summary["p"]], color="C1", label="importance: T·p_t")
    right.axhline(1.0, color="gray", linestyle="--", label="uniform")
    right.set(xscale="log", yscale="log", xlabel="timestep t + 1", ylabel="T · p_t",
              title=f"batch-loss s.d.: {summary['uniform_std']:.3g} uniform, {summary['importance_std']:.3g} importance")  # fmt: skip
    right.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A pipeline folder written by train_ddpm.py.")
    parser.add_argument("--output", type=Path, required=True, help="The PNG to write.")
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    parser.add_argument("--loss_weighting", choices=LOSS_WEIGHTINGS,
                        help="The objective (default: the model's training_config.json, else vlb).")  # fmt: skip
    parser.add_argument("--snr_gamma", type=float,
                        help=f"γ of min_snr (default: the model's training_config.json, else {DEFAULT_SNR_GAMMA:g}).")  # fmt: skip
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--stride", type=int, default=1, help="Visit every n-th timestep (1 = all, exact).")
    parser.add_argument("--batch_size", type=int, default=32, help="The batch whose loss estimate's s.d. is reported.")
    parser.add_argument("--uniform_prob", type=float, default=DEFAULT_IMPORTANCE_UNIFORM_PROB)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--title", help="The left panel's title (default: the model folder's name and the loss).")
    args = parser.parse_args(argv)
    config_path = Path(args.model) / CONFIG_FILE_NAME
    trained = TrainingConfig.load(config_path) if config_path.is_file() else None
    weighting = args.loss_weighting or (trained.loss_weighting if trained else "vlb")
    snr_gamma = args.snr_gamma or (trained and trained.snr_gamma) or DEFAULT_SNR_GAMMA
    timesteps, losses = per_timestep_losses(args.model, weighting, args.num_images, args.stride, args.seed, snr_gamma)
    summary = estimator_spread(losses, args.uniform_prob, args.batch_size)
    summary.update(model=args.model, loss_weighting=weighting, num_images=args.num_images, stride=args.stride,
                   batch_size=args.batch_size, timesteps=timesteps)  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k not in ("mean", "p", "timesteps")}))
    plot(timesteps, summary, args.title or f"{Path(args.model).name}: {weighting} loss", args.output)
    if args.json:
        args.json.write_text(json.dumps(summary) + "\n")
    print(f"wrote {args.output}")
    return summary


if __name__ == "__main__":
    main()
