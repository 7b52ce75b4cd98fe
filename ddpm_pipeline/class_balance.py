"""The class labels of a data set's images, where it has them (a ``datasets.ClassLabel`` column:
an image folder's class subfolders, a Hub data set's ``label``): how many classes a set of its
images holds, against what as many images drawn at random would hold. A source that lists its
images class by class gives a slice of its first or last rows one class or two, which the
training run warns of (:func:`sliced_classes_warning`; the held-out bound's sets:
:func:`~ddpm_pipeline.validation.unbalanced_classes_warning`).
"""

from __future__ import annotations

import math

import datasets
import numpy as np

#: A set of images holds "too few" classes when random images would hold as few this rarely.
RARE = 0.01

#: The one line that saves an image folder shuffled, for the warnings' fixes (then ``--dataset_path OUT``).
SHUFFLED_COPY = "datasets.load_dataset('imagefolder', data_dir=FOLDER, split='train').shuffle(seed=0).save_to_disk(OUT)"


def class_column(dataset: datasets.Dataset) -> str | None:
    """The data set's first column of class labels (a ``datasets.ClassLabel`` feature: an image
    folder's class subfolders, a Hub data set's ``label``), or None."""
    return next((name for name, feature in dataset.features.items() if isinstance(feature, datasets.ClassLabel)), None)


def class_labels(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """The class labels of the rows of ``dataset`` that have one (``-1`` is ``datasets``' missing
    label); its ``column`` alone is read, not the images."""
    labels = np.asarray(dataset.select_columns([column]).with_format("numpy")[column], dtype=np.int64)
    return labels[labels >= 0]


def expected_classes(frequencies: np.ndarray, count: int) -> float:
    """How many distinct classes ``count`` images drawn at random (with replacement) hold, on
    average, from classes of these ``frequencies``: ``Σ_k 1 − (1 − p_k)^count``."""
    shares = frequencies[frequencies > 0] / frequencies.sum()
    return float(np.sum(1 - (1 - shares) ** count))


def chance_of_so_few_classes(frequencies: np.ndarray, count: int, classes: int, draws: int = 4000) -> float:
    """The chance that ``count`` images drawn at random (with replacement) from classes of these
    ``frequencies`` hold at most ``classes`` distinct classes ``h``, estimated from ``draws`` seeded
    draws (the same estimate each time; fewer for large ``count``: 20 million labels in all, and
    at least 200 draws). Where the union bound over the sets of ``h`` classes,
    ``C(K, h) · (p_1 + … + p_h)^count`` with the ``h`` largest shares, is below 10⁻⁶, or
    ``count`` exceeds 100,000 (a draw would take seconds), that bound instead."""
    shares = np.sort(frequencies[frequencies > 0] / frequencies.sum())[::-1]
    if classes >= expected_classes(frequencies, count):
        return 0.5  # at least as many as on average: no need to count draws
    sets = math.lgamma(len(shares) + 1) - math.lgamma(classes + 1) - math.lgamma(len(shares) - classes + 1)
    bound = math.exp(min(0.0, sets + count * math.log(float(shares[:classes].sum())))) if classes else 0.0
    if bound < 1e-6 or count > 100_000:
        return bound
    draws = min(draws, max(200, 20_000_000 // count))  # at most 20 million labels drawn (seconds), at least 200 draws
    rng, at_most = np.random.default_rng(0), 0
    rows = max(1, 1_000_000 // count)  # draws at a time: at most a million labels in memory
    for start in range(0, draws, rows):
        labels = np.sort(rng.choice(len(shares), size=(min(rows, draws - start), count), p=shares), axis=1)
        held = 1 + np.count_nonzero(np.diff(labels, axis=1), axis=1)
        at_most += int(np.count_nonzero(held <= classes))
    return at_most / draws


def classes_in_words(names: list[str], labels: list[int], shown: int = 3) -> str:
    """``"'cat', 'dog', …"``: the class ``names`` of the first ``shown`` of ``labels``."""
    return ", ".join(repr(names[label]) for label in labels[:shown]) + (", …" if len(labels) > shown else "")


def sliced_classes_warning(dataset: datasets.Dataset, split: str, option: str, fix: str) -> str | None:
    """A warning when ``split`` (the value of ``option``) is a slice (``train[:1000]``) whose images
    hold so few of the classes their :func:`class_column` names that as many images drawn at random
    from those classes, equally often, would hold as few under :data:`RARE` of the time: the slice
    of a source that lists its images class by class took its first (or last) classes alone. The
    warning ends with ``fix``. None otherwise."""
    column = class_column(dataset)
    if "[" not in split or column is None:
        return None
    names = dataset.features[column].names
    labels = class_labels(dataset, column)
    held = sorted(set(labels.tolist()))
    if len(names) < 2 or not held or chance_of_so_few_classes(np.ones(len(names)), len(labels), len(held)) >= RARE:
        return None
    return (
        f"{option} {split!r} holds {len(held)} of the {len(names)} classes that its {column} column names "
        f"({classes_in_words(names, held)}): the "
        f"source lists its images class by class, so a slice of it takes the first (or last) classes alone. {fix}"
    )
