"""PNG outputs a person looks at: sample grids, the training-loss curve and metric curves."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2, scale: int = 2) -> Image.Image:
    """Tile images ``[N, H, W, C]`` with values in [0, 1] (C = 1 or 3) into one picture.

    ``columns`` defaults to ``ceil(√N)``; cells are separated by ``padding`` white pixels and the
    whole grid is enlarged ``scale`` times (nearest neighbour, so pixels stay sharp).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"image_grid takes images [N, H, W, 1 or 3], got shape {images.shape}.")
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pixels = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    canvas = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255, np.uint8
    )
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[top : top + height, left : left + width] = pixels[index]
    grid = Image.fromarray(canvas[..., 0] if channels == 1 else canvas, mode="L" if channels == 1 else "RGB")
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


#: characters of a panel title per line (a 7-inch panel at matplotlib's default title size)
TITLE_WIDTH = 70


def panel_title(text: str) -> str:
    """``text`` broken into lines of at most :data:`TITLE_WIDTH` characters, so that a long title
    (a Hub id or a folder's name in it) stays inside its panel instead of running off the figure."""
    return "\n".join(textwrap.wrap(text, TITLE_WIDTH)) if len(text) > TITLE_WIDTH else text


def save_image_grid(images: np.ndarray, path: str | Path, **grid_kwargs) -> Path:
    """Write :func:`image_grid` of ``images`` as a PNG; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, **grid_kwargs).save(path, format="PNG")
    return path


def moving_average(values: Sequence[float], window: int, centered: bool = False) -> np.ndarray:
    """Mean of the finite values in a window (NaN where it holds none): trailing,
    ``m_i = mean(v_{max(0, i-window+1)..i})``, or centred, ``m_i = mean(v_{i-h..i+h})`` with
    ``h = min(⌊window/2⌋, i, n-1-i)``, narrowed at the ends so that it stays centred (a steep
    start then makes no kink where its values leave the window)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    finite = np.isfinite(values)
    cumulative = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counted = np.concatenate([[0], np.cumsum(finite)])
    ends = np.arange(1, len(values) + 1)
    if centered:
        index = np.arange(len(values))
        half = np.minimum(window // 2, np.minimum(index, len(values) - 1 - index))
        starts, ends = index - half, index + half + 1
    else:
        starts = np.maximum(0, ends - window)
    counts = counted[ends] - counted[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (cumulative[ends] - cumulative[starts]) / counts, np.nan)


def _suits_log_scale(*series: Sequence[float]) -> bool:
    """Whether the finite values of ``series`` exist and are all positive (NaN marks a missing one)."""
    values = np.concatenate([np.asarray(values, dtype=np.float64) for values in series])
    values = values[np.isfinite(values)]
    return values.size > 0 and bool(values.min() > 0)


@contextmanager
def _png_figure(path: str | Path, **subplots: object) -> Iterator[tuple[object, object]]:
    """A matplotlib figure and its axes (``plt.subplots(**subplots)``, headless Agg backend), laid
    out and written to ``path`` as a PNG when the block ends; closed in any case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(**subplots)
    try:
        yield figure, axes
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


def loss_window(num_steps: int) -> int:
    """Steps the loss curve averages over: ``max(⌊n/50⌋, min(10, ⌊n/5⌋), 1)`` for ``n`` steps (16
    for the main job's 800; 10 rather than 2 for a 100-step fine-tune, whose per-step losses
    ranged over a factor of 4)."""
    return max(num_steps // 50, min(10, num_steps // 5), 1)


def save_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | Path,
    title: str = "",
    by_quarter: dict[str, Sequence[float]] | None = None,
) -> Path:
    """Plot the per-step loss (faint) and its moving average (:func:`loss_window`) as a PNG; with
    ``by_quarter`` (a label and per-step values, NaN where none, for each quarter of the
    timesteps), a second panel with each quarter's moving average."""
    panels = 2 if by_quarter else 1
    with _png_figure(path, ncols=panels, figsize=(7 * panels, 4), dpi=120, squeeze=False) as (_, axes):
        axis = axes[0][0]
        window = loss_window(len(steps))
        if len(steps):
            axis.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
            axis.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=1.8,
                      label=f"moving average ({window} steps)")  # fmt: skip
            if _suits_log_scale(losses):
                axis.set_yscale("log")
            axis.legend()
        axis.set_title(panel_title(title or "training loss"))
        if by_quarter:
            quarters = axes[0][1]
            for index, (label, values) in enumerate(by_quarter.items()):
                # a quarter has few images per step: average over four times the window, centred so
                # that the first steps' high losses leaving the window make no kink
                smooth = moving_average(values, 4 * window, centered=True)
                quarters.plot(steps, smooth, color=f"C{index}", linewidth=1.5, label=label)
            if _suits_log_scale(*by_quarter.values()):
                quarters.set_yscale("log")
            quarters.legend(title="timesteps")
            quarters.set_title(f"loss by quarter of the timesteps (centred moving average, {4 * window} steps)")
        for axis in axes[0]:
            axis.set_xlabel("optimizer step")
            axis.set_ylabel("training loss")
            axis.grid(True, which="both", alpha=0.3)
    return Path(path)


def save_bound_terms_plot(per_timestep: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Plot the variational bound's terms against the diffusers timestep t (bits/dim, log scale):
    the decoder term ``L_0`` at t = 0 and ``L_{t-1}`` (KL) for t ≥ 1, with the running total."""
    values = np.asarray(per_timestep, dtype=np.float64)
    with _png_figure(path, ncols=2, figsize=(10, 4), dpi=120) as (figure, (terms_axis, total_axis)):
        steps = np.arange(len(values))
        terms_axis.plot(steps[1:], np.maximum(values[1:], 1e-12), color="tab:blue", linewidth=1.2, label="KL terms")
        terms_axis.scatter([0], [max(values[0], 1e-12)], color="tab:red", zorder=3, label="decoder term (t = 0)")
        terms_axis.set_yscale("log")
        terms_axis.set_xlabel("timestep t")
        terms_axis.set_ylabel("bits/dim")
        terms_axis.set_title("terms of the bound")
        terms_axis.legend()
        total_axis.plot(steps, np.cumsum(values), color="tab:green", linewidth=1.5)
        total_axis.set_xlabel("timestep t")
        total_axis.set_ylabel("bits/dim (without the prior)")
        total_axis.set_title("cumulative sum over t ≤ T'")
        for axis in (terms_axis, total_axis):
            axis.grid(True, which="both", alpha=0.3)
        figure.suptitle(title or f"variational bound: {values.sum():.4f} bits/dim (+ prior)")
    return Path(path)


def save_metric_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    floor: float | None = None,
    floor_label: str = "floor",
) -> Path:
    """Plot one line with markers per named series ``{label: (x values, y values)}`` (each sorted
    by x), and an optional horizontal ``floor`` line (e.g. real data's own FID), as a PNG."""
    with _png_figure(path, figsize=(7, 4.5), dpi=120) as (_, axis):
        for label, (xs, ys) in series.items():
            xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
            order = np.argsort(xs)
            axis.plot(xs[order], ys[order], marker="o", linewidth=1.6, label=label)
        if floor is not None:
            axis.axhline(floor, color="gray", linestyle="--", linewidth=1.2, label=floor_label)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(panel_title(title))
        axis.grid(True, alpha=0.3)
        if series or floor is not None:
            axis.legend()
    return Path(path)


def save_metrics_over_training(
    steps: Sequence[int],
    minutes: Sequence[float],
    metrics: dict[str, Sequence[float | None]],
    path: str | Path,
    title: str = "",
) -> Path:
    """One panel per metric ``{label: values}`` (a value per point, None where it was not
    measured) against the training step of each point, whose tick also names its training
    minutes: how a run's scores move as it trains (e.g. FID of each ``--snapshot_*`` pipeline)."""
    if not metrics:
        raise ValueError("No metrics to plot: pass at least one {label: values}.")
    count = len(metrics)
    columns = min(count, 3)
    layout = {"nrows": math.ceil(count / columns), "ncols": columns, "figsize": (4.2 * columns, 3.4 * math.ceil(count / columns)),
              "dpi": 120, "squeeze": False}  # fmt: skip
    xs = np.asarray(steps, dtype=np.float64)
    ticks = [f"{step:,}\n{minute:.2g} min" for step, minute in zip(steps, minutes, strict=True)]
    gaps = np.diff(np.sort(xs))
    crowded = len(xs) > 1 and gaps.min() < 0.15 * (xs.max() - xs.min())  # labels that would run into each other
    with _png_figure(path, **layout) as (figure, axes):
        for axis, (label, values) in zip(axes.flat, metrics.items(), strict=False):
            ys = np.asarray([np.nan if value is None else value for value in values], dtype=np.float64)
            measured = np.isfinite(ys)
            axis.plot(xs[measured], ys[measured], marker="o", linewidth=1.6)
            axis.set_xticks(xs, ticks, fontsize=7, rotation=45 if crowded else 0, ha="right" if crowded else "center")
            axis.set_xlabel("training step (and minutes)")
            axis.set_title(label)
            axis.grid(True, alpha=0.3)
        for axis in list(axes.flat)[count:]:
            axis.axis("off")
        if title:
            figure.suptitle(title)
    return Path(path)


def save_labelled_images(panels: Sequence[tuple[str, str | Path]], path: str | Path, columns: int = 3) -> Path:
    """Lay out PNG files side by side, ``columns`` to a row, each titled with its label (e.g. one
    sample grid per recipe of a study, titled with its score), as one PNG."""
    if not panels:
        raise ValueError("No images to lay out: pass at least one (label, path) pair.")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    layout = {"nrows": rows, "ncols": columns, "figsize": (3.2 * columns, 3.5 * rows), "dpi": 120, "squeeze": False}
    with _png_figure(path, **layout) as (_, axes):
        for index, axis in enumerate(axes.flat):
            axis.axis("off")
            if index < len(panels):
                label, image_path = panels[index]
                with Image.open(image_path) as image:
                    axis.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
                axis.set_title(label, fontsize=9)
    return Path(path)
