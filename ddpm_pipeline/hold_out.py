"""Which images a share of a split holds out of training (``--validation_split 0.05``, ``5%``, ``500``).

:func:`held_out_amount` reads the option: a count, a share, or None for a split's name, which
``datasets`` reads. :func:`held_out_count` turns a share of ``M`` images into a count. Two ways
pick the rows (``--validation_rows``):

* ``random`` (the default): :func:`random_rows`, rows drawn at random by a fixed seed, so the held-out
  images are a fair sample of the split however it is ordered. An image folder of class subfolders
  lists its images class by class, and its last rows are one class. The run records the share, and
  :func:`split_at_random` draws the same rows again for a resumed run or ``eval_metrics.py``.
* ``last``: :func:`hold_out_last_rows`, the split's last rows, as Keras' ``validation_split`` takes
  them, recorded as the two plain ``datasets`` splits they are (``train[:9500]``, ``train[9500:]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import datasets
import numpy as np

from .splits import read_instruction, split_names

#: the seed of :func:`random_rows` for a run's share. It is fixed, not the run's ``--seed``, so that
#: runs that differ in their seed hold out the same images and their held-out bounds compare.
HOLD_OUT_SEED = 0
_COUNT = re.compile(r"\d+")
_SHARE = re.compile(r"\d*\.\d+|\d+\.")
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)%")
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def held_out_amount(validation_split: str) -> int | float | None:
    """``--validation_split`` read as an amount of the training split to hold out: a count
    (``"500"`` → ``500``, an int) or a share (``"0.05"`` and ``"5%"`` → ``0.05``, a float in
    (0, 1)); None when it names a split (``"test"``, ``"train[-500:]"``), which ``datasets`` reads.
    Raises ValueError for a count below 1 or a share outside (0, 1)."""
    text = "".join(validation_split.split())  # "5 %" as "5%"
    if _COUNT.fullmatch(text):
        if int(text) < 1:
            raise ValueError(f"--validation_split {validation_split!r} holds out no image: give a count of at least 1 (500) "
                             "or a share (0.05, 5%).")  # fmt: skip
        return int(text)
    percent = _PERCENT.fullmatch(text)
    if percent is None and not _SHARE.fullmatch(text):
        return None
    share = float(percent.group(1)) / 100 if percent else float(text)
    if not 0 < share < 1:
        raise ValueError(f"--validation_split {validation_split!r} is not a share between 0 and 1 of the training split: "
                         "give one like 0.05 or 5%, a count of images (500), or a split (test, train[-500:]).")  # fmt: skip
    return share


def held_out_count(amount: int | float, total: int, split: str, option: str = "--validation_split") -> int:
    """How many of the ``total`` images of ``split`` an ``amount`` (:func:`held_out_amount`, given
    as ``option``) holds out: ``amount`` itself for a count (an int); for a share ``f`` (a float),
    ``n = ⌊f·M + ½⌋``, at least 1. Raises ValueError when ``n`` leaves no image to train on."""
    count = amount if isinstance(amount, int) else max(1, int(amount * total + 0.5))
    if count >= total:
        raise ValueError(f"{option} {amount} would hold out {count:,} of the {total:,} images of split {split!r}, leaving "
                         f"none to train on: hold out fewer, e.g. {option} 0.05.")  # fmt: skip
    return count


def _splitmix64(states: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of each 64-bit state ``z``: ``z ← (z ⊕ z≫30)·0xBF58476D1CE4E5B9``,
    ``z ← (z ⊕ z≫27)·0x94D049BB133111EB``, ``z ⊕ z≫31``, in arithmetic modulo 2⁶⁴."""
    z = states.copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_rows(total: int, count: int, seed: int = HOLD_OUT_SEED) -> np.ndarray:
    """The ``count`` rows of ``0 … total−1`` held out at random, in increasing order: row ``i``
    draws ``u_i``, the ``i``-th output of the SplitMix64 generator started at ``seed`` (state
    ``seed + (i+1)·0x9E3779B97F4A7C15 mod 2⁶⁴``, then :func:`_splitmix64`), and the rows with the
    ``count`` smallest draws are held out (a tie: the earlier row). The formula fixes the rows on
    any machine and any version of the libraries. A row's draw does not depend on ``total``, so the
    rows held out of a count are among those of any larger count, and images added after the last
    row take a held-out place only where their draw is among the smallest."""
    with np.errstate(over="ignore"):  # the arithmetic is modulo 2⁶⁴ by design
        states = np.uint64(seed % 2**64) + np.arange(1, total + 1, dtype=np.uint64) * _GOLDEN_GAMMA
    draws = _splitmix64(states)
    return np.sort(np.argsort(draws, kind="stable")[:count])


def split_at_random(dataset: datasets.Dataset, amount: int | float, split: str, seed: int = HOLD_OUT_SEED,
                    option: str = "--validation_split") -> tuple[datasets.Dataset, datasets.Dataset]:  # fmt: skip
    """``(training images, held-out images)`` of ``dataset``, the loaded ``split``: the rows that
    ``amount`` (:func:`held_out_amount`, :func:`held_out_count`; given as ``option``) holds out at
    random (:func:`random_rows`), and the others, each in the split's order."""
    held_out = random_rows(len(dataset), held_out_count(amount, len(dataset), split, option), seed)
    kept = np.ones(len(dataset), dtype=bool)
    kept[held_out] = False
    return dataset.select(np.flatnonzero(kept)), dataset.select(held_out)


def held_out_share(dataset: datasets.Dataset, amount: str, split: str, seed: int = HOLD_OUT_SEED) -> datasets.Dataset:
    """The images of ``dataset`` (the loaded ``split``) that a run with ``--validation_split amount``
    and ``--validation_rows random`` held out (:func:`split_at_random`): what ``eval_metrics.py``
    measures the bound on by default (its ``--bpd_held_out``). Raises ValueError when ``amount`` is
    not a share or a count, or holds out the whole split."""
    parsed = held_out_amount(amount)
    if parsed is None:
        raise ValueError(f"{amount!r} is not a share (0.05, 5%) or a count (500) of images to hold out.")
    return split_at_random(dataset, parsed, split, seed, option="--bpd_held_out")[1]


def _split_part(name: str, start: int, end: int, size: int) -> str:
    """One part of a split spec, as ``datasets`` reads it: ``train``, ``train[:9500]``, ``train[9500:]``, ``train[10:20]``."""
    if start == 0 and end == size:
        return name
    return f"{name}[{start or ''}:{'' if end == size else end}]"


def hold_out_last_rows(split: str, amount: int | float, split_size: Callable[[str], int]) -> tuple[str, str]:
    """``(training split, held-out split)``: ``split``'s rows (read as ``datasets`` reads a split
    spec, with ``split_size(name)`` rows in split ``name``) less their last ``n``
    (:func:`held_out_count`), and those ``n``. A sum of splits gives up the rows of its last parts.
    ``hold_out_last_rows("train", 0.05, {"train": 10_000}.get)`` → ``("train[:9500]", "train[9500:]")``.
    Raises ValueError when ``n`` leaves no row to train on."""
    names = dict.fromkeys(split_names(split))
    sizes = {name: split_size(name) for name in names}
    parts = [(part.splitname, part.from_, part.to) for part in read_instruction(split).to_absolute(sizes)]
    parts = [(name, start, end) for name, start, end in parts if start < end]
    count = held_out_count(amount, sum(end - start for _, start, end in parts), split)
    training, held_out, left = [], [], count
    for name, start, end in reversed(parts):
        taken = min(left, end - start)
        left -= taken
        if taken:
            held_out.insert(0, _split_part(name, end - taken, end, sizes[name]))
        if end - taken > start:
            training.insert(0, _split_part(name, start, end - taken, sizes[name]))
    return "+".join(training), "+".join(held_out)
