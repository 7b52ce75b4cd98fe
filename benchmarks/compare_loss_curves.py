"""Several training runs' loss curves on one axis (each run's per-step loss, faint, and its moving average).

    python benchmarks/compare_loss_curves.py runs/lvlb/uniform runs/lvlb/importance --output docs/lvlb_loss_curves.png

Reads each ``--output_dir``'s ``loss_history.csv``; a run is labelled by its folder name, or by
``--labels``. Prints each run's loss over the last quarter of its steps: the mean and the standard
deviation of one step's loss (how noisy the objective's estimate is).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ddpm_pipeline.plots import moving_average  # noqa: E402
from ddpm_pipeline.run_outputs import LOSS_HISTORY_NAME  # noqa: E402
from ddpm_pipeline.run_records import read_loss_history  # noqa: E402


def read_history(run: Path) -> tuple[list[int], list[float]]:
    rows = read_loss_history(run / LOSS_HISTORY_NAME)
    return [row["step"] for row in rows], [row["loss"] for row in rows]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train_ddpm.py output folders.")
    parser.add_argument("--labels", nargs="+", help="One label per run (default: the folder names).")
    parser.add_argument("--output", type=Path, required=True, help="The PNG to write.")
    parser.add_argument("--title", default="training loss")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels.")
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    summary = {}
    for index, (run, label) in enumerate(zip(args.runs, labels, strict=True)):
        steps, losses = read_history(run)
        window = max(1, len(steps) // 50)
        axis.plot(steps, losses, color=f"C{index}", alpha=0.2, linewidth=0.7)
        axis.plot(steps, moving_average(losses, window), color=f"C{index}", linewidth=1.8, label=label)
        tail = losses[len(losses) * 3 // 4 :]
        summary[label] = {"mean": statistics.fmean(tail), "std": statistics.stdev(tail) if len(tail) > 1 else 0.0}
        print(f"{label}: last {len(tail)} steps' loss {summary[label]['mean']:.4g} ± {summary[label]['std']:.3g} (s.d. of one step)")
    axis.set(yscale="log", xlabel="optimizer step", ylabel="training loss", title=args.title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output)
    plt.close(figure)
    print(f"wrote {args.output}")
    return summary


if __name__ == "__main__":
    main()
