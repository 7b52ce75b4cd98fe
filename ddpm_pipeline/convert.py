"""Turn local archives into saved `datasets` data sets, for machines without the Hub.

    python -m ddpm_pipeline.convert idx --images train-images-idx3-ubyte.gz \\
        --labels train-labels-idx1-ubyte.gz --classes fashion-mnist --output data/fmnist-train
    python -m ddpm_pipeline.convert cifar10 --archive cifar-10-python.tar.gz --split train \\
        --output data/cifar10-train

Train on the result with ``--dataset_path``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .console import run_command
from .data import FASHION_MNIST_CLASSES, cifar10_archive_to_dataset, idx_to_dataset

CLASS_NAMES = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": [str(i) for i in range(10)], "none": None}


def main(argv: list[str] | None = None) -> Path:
    """Parse the command line, convert, ``save_to_disk`` and return the output folder."""
    parser = argparse.ArgumentParser(prog="python -m ddpm_pipeline.convert", description=__doc__.split("\n")[0])
    formats = parser.add_subparsers(dest="format", required=True)
    idx = formats.add_parser("idx", help="MNIST / Fashion-MNIST IDX files (gzip or raw)")
    idx.add_argument("--images", required=True, type=Path, help="the images' IDX file, e.g. train-images-idx3-ubyte.gz")
    idx.add_argument("--labels", type=Path, help="the labels' IDX file, e.g. train-labels-idx1-ubyte.gz (none: no label column)")
    idx.add_argument("--classes", choices=sorted(CLASS_NAMES), default="none", help="label names to record")
    cifar = formats.add_parser("cifar10", help="the CIFAR-10 python archive (cifar-10-python.tar.gz)")
    cifar.add_argument("--archive", required=True, type=Path, help="cifar-10-python.tar.gz")
    cifar.add_argument("--split", choices=["train", "test"], default="train")
    for sub in (idx, cifar):
        sub.add_argument("--output", required=True, type=Path, help="folder for Dataset.save_to_disk")
    args = parser.parse_args(argv)
    for option in ("images", "labels", "archive"):
        path = getattr(args, option, None)
        if path is not None and not path.is_file():
            parser.error(f"--{option} {path} is not a file.")
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        parser.error(f"--output {args.output} exists and is not an empty folder; choose a new folder.")
    if args.format == "idx":
        dataset = idx_to_dataset(args.images, args.labels, CLASS_NAMES[args.classes])
    else:
        dataset = cifar10_archive_to_dataset(args.archive, args.split)
    dataset.save_to_disk(str(args.output))
    print(f"Saved {dataset.num_rows} images with columns {dataset.column_names} to {args.output}")
    return args.output


if __name__ == "__main__":
    run_command(main, "python -m ddpm_pipeline.convert")
