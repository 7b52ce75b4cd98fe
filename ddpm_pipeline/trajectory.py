"""What a sampler saw on its way: x_t, the predicted noise and the predicted x̂_0 at chosen steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROW_LABELS = ("x_t", "pred. noise", "pred. x0")


@dataclass
class DDPMTrajectory:
    """Snapshots of a sampling run, each a float32 CPU tensor ``[S, B, C, H, W]`` in model space
    (images in [-1, 1]), where ``S = len(timesteps)``.

    ``samples[i]`` is ``x_t`` before the step at ``timesteps[i]``; ``noise_predictions[i]`` and
    ``x0_predictions[i]`` are ``ε̂`` and ``x̂_0`` predicted from it (``x̂_0`` clipped as the
    scheduler clips it).
    """

    timesteps: list[int]
    samples: torch.Tensor
    noise_predictions: torch.Tensor
    x0_predictions: torch.Tensor

    def save_png(self, path: str | Path, max_images: int = 4, cell_size: int = 64) -> Image.Image:
        """Render with :func:`render_trajectory` and write a PNG to ``path``."""
        return render_trajectory(self, path, max_images=max_images, cell_size=cell_size)


def _to_pixels(tensor: torch.Tensor, is_noise: bool) -> np.ndarray:
    """``[C, H, W]`` → uint8 ``[H, W, 3]``: images map [-1, 1] to [0, 255]; noise maps [-3, 3]."""
    scaled = tensor.clamp(-3, 3) / 6 + 0.5 if is_noise else (tensor / 2 + 0.5).clamp(0, 1)
    array = (scaled * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]


def render_trajectory(
    trajectory: DDPMTrajectory,
    path: str | Path | None = None,
    max_images: int = 4,
    cell_size: int = 64,
) -> Image.Image:
    """One image of the sampling table: for each of the first ``max_images`` samples, three rows
    (``x_t``, predicted noise ``ε̂``, predicted ``x̂_0``) by one column per recorded timestep.

    Images are shown on [-1, 1], noise on [-3, 3], each cell upscaled to ``cell_size`` pixels high
    (and as wide as the images' aspect ratio makes it). Saved as PNG when ``path`` is given.
    """
    num_images = min(max_images, trajectory.samples.shape[1])
    num_steps = len(trajectory.timesteps)
    font = ImageFont.load_default()
    label_width, header_height, gap = 96, 20, 4
    rows = num_images * len(ROW_LABELS)
    image_height, image_width = trajectory.samples.shape[-2:]
    cell_width = max(1, round(cell_size * image_width / image_height))
    width = label_width + num_steps * (cell_width + gap)
    height = header_height + rows * (cell_size + gap) + (num_images - 1) * gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, timestep in enumerate(trajectory.timesteps):
        draw.text((label_width + column * (cell_width + gap) + 4, 4), f"t={timestep}", fill="black", font=font)
    sources = (trajectory.samples, trajectory.noise_predictions, trajectory.x0_predictions)
    for image_index in range(num_images):
        for kind, (label, source) in enumerate(zip(ROW_LABELS, sources, strict=True)):
            row = image_index * len(ROW_LABELS) + kind
            top = header_height + row * (cell_size + gap) + image_index * gap
            draw.text((4, top + cell_size // 2 - 6), label, fill="black", font=font)
            for column in range(num_steps):
                pixels = _to_pixels(source[column, image_index], is_noise=kind == 1)
                cell = Image.fromarray(pixels).resize((cell_width, cell_size), Image.NEAREST)
                canvas.paste(cell, (label_width + column * (cell_width + gap), top))
    if path is not None:
        canvas.save(path, format="PNG")
    return canvas
