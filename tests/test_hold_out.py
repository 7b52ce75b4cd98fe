"""Which images a --validation_split share holds out (hold_out.py): the amount read from the option,
the last rows as two plain splits, or rows drawn at random by a formula that fixes them anywhere."""

import re

import datasets
import numpy as np
import pytest

from ddpm_pipeline.data import shared_rows
from ddpm_pipeline.evaluation import EvaluationConfig
from ddpm_pipeline.hold_out import (
    HOLD_OUT_SEED,
    held_out_amount,
    held_out_share,
    hold_out_last_rows,
    random_rows,
    split_at_random,
)
from ddpm_pipeline.reference import DataSource
from ddpm_pipeline.training_config import TrainingConfig


@pytest.mark.parametrize(("text", "amount"), [
    ("500", 500), ("1", 1), ("0.05", 0.05), (".5", 0.5), ("5%", 0.05), ("12.5%", 0.125), (" 0.1 ", 0.1), ("5 %", 0.05),
    ("test", None), ("train[-500:]", None), ("train[:5%]", None), ("validation", None),
])  # fmt: skip
def test_a_held_out_share_or_count_is_read_apart_from_split_names(text, amount):
    assert held_out_amount(text) == (pytest.approx(amount) if isinstance(amount, float) else amount)
    assert type(held_out_amount(text)) is type(amount)


@pytest.mark.parametrize("text", ["0", "0.0", "1.0", "1.", "150%", "0%", "100%"])
def test_a_held_out_share_outside_0_and_1_is_refused(text):
    with pytest.raises(ValueError, match=re.escape(f"--validation_split {text!r}")):
        held_out_amount(text)
    with pytest.raises(ValueError, match=re.escape(f"--validation_split {text!r}")):
        TrainingConfig(validation_split=text).validate()


@pytest.mark.parametrize(("split", "amount", "sizes", "expected"), [
    ("train", 0.05, {"train": 10_000}, ("train[:9500]", "train[9500:]")),
    ("train", 500, {"train": 10_000}, ("train[:9500]", "train[9500:]")),
    ("train[:1000]", 100, {"train": 10_000}, ("train[:900]", "train[900:1000]")),
    ("train[100:200]", 0.25, {"train": 10_000}, ("train[100:175]", "train[175:200]")),
    ("train[:10%]", 0.5, {"train": 1005}, ("train[:50]", "train[50:100]")),  # 10% of 1005 rows: 100, as datasets rounds
    ("train+test", 0.1, {"train": 60, "test": 10}, ("train+test[:3]", "test[3:]")),  # 7 of 70 rows
    ("train+test[:4]", 6, {"train": 60, "test": 10}, ("train[:58]", "train[58:]+test[:4]")),  # past the last part
    ("train", 0.001, {"train": 30}, ("train[:29]", "train[29:]")),  # a share is at least one image
])  # fmt: skip
def test_a_held_out_share_holds_out_the_last_rows_of_the_training_split(split, amount, sizes, expected):
    training, held_out = hold_out_last_rows(split, amount, sizes.get)
    assert (training, held_out) == expected
    # the two parts are the training split's rows, each once, as datasets reads the specs
    assert shared_rows(training, held_out, sizes.get) == []
    whole = sum(end - start for _, start, end in shared_rows(split, split, sizes.get))
    assert sum(end - start for _, start, end in shared_rows(split, training, sizes.get) + shared_rows(split, held_out, sizes.get)) == whole


def test_a_held_out_share_that_leaves_nothing_to_train_on_is_refused():
    with pytest.raises(ValueError, match=r"would hold out 30 of the 30 images of split 'train\[:30\]', leaving none"):
        hold_out_last_rows("train[:30]", 30, {"train": 100}.get)
    with pytest.raises(ValueError, match="leaving none"):
        hold_out_last_rows("train", 0.99, {"train": 20}.get)
    with pytest.raises(ValueError, match=r"--split 'train\[::2\]' is not a split name or slice"):
        hold_out_last_rows("train[::2]", 0.1, {"train": 20}.get)


def splitmix64(state):
    """SplitMix64 written out on Python's integers, as its authors publish it, to check the vectorized one."""
    mask = 2**64 - 1
    state = (state + 0x9E3779B97F4A7C15) & mask
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return state, z ^ (z >> 31)


def test_rows_held_out_at_random_are_the_smallest_splitmix64_draws():
    """Row i draws SplitMix64's i-th output from the seed: the rows of the smallest draws are
    held out, in order; the same on every machine (the formula, and SplitMix64's published first
    output for seed 0, are fixed here)."""
    state, draws = HOLD_OUT_SEED, []
    for _ in range(50):
        state, value = splitmix64(state)
        draws.append(value)
    assert draws[0] == 0xE220A8397B1DCDAF  # SplitMix64's first output from 0, as published with the generator
    expected = sorted(sorted(range(50), key=lambda row: draws[row])[:7])
    assert random_rows(50, 7).tolist() == expected
    assert random_rows(50, 7, seed=1).tolist() != expected  # another seed, other rows
    assert random_rows(50, 0).tolist() == [] and random_rows(50, 50).tolist() == list(range(50))


def test_rows_held_out_at_random_nest_and_keep_their_places_as_rows_are_added():
    """A row's draw does not depend on how many rows there are: a smaller share's rows are among a
    larger's, and rows added at the end change the held-out rows only where they take a place."""
    small, large = set(random_rows(10_000, 100).tolist()), set(random_rows(10_000, 500).tolist())
    assert small <= large and len(small) == 100 and len(large) == 500
    before, after = random_rows(10_000, 500), random_rows(10_100, 500)  # 100 images added after the last
    added = [row for row in after.tolist() if row >= 10_000]
    assert set(after.tolist()) - set(added) <= set(before.tolist())
    assert len(set(before.tolist()) - set(after.tolist())) == len(added)


def test_rows_held_out_at_random_are_a_fair_sample_of_a_class_sorted_split():
    """A split listed class by class (10 classes of 1,000) gives a 5% random share about 50 images
    of each class, where its last rows would be of the last class alone: each count is within
    4.5 standard deviations of the hypergeometric mean."""
    held = random_rows(10_000, 500)
    counts = np.bincount(held // 1000, minlength=10)
    sd = (500 * 0.1 * 0.9 * (10_000 - 500) / (10_000 - 1)) ** 0.5
    assert np.all(np.abs(counts - 50) < 4.5 * sd), counts
    assert counts.sum() == 500 and len(np.unique(held)) == 500


def test_a_split_held_out_at_random_is_a_partition_of_its_rows():
    """split_at_random gives the rows a share holds out and the others, each once and in order;
    held_out_share, what eval_metrics.py measures, the same held-out rows."""
    dataset = datasets.Dataset.from_dict({"x": list(range(40))})
    training, held_out = split_at_random(dataset, 0.25, "train")
    assert len(held_out) == 10 and len(training) == 30
    assert sorted([*training["x"], *held_out["x"]]) == list(range(40))
    assert list(training["x"]) == sorted(training["x"])
    assert list(held_out["x"]) == random_rows(40, 10).tolist() == sorted(held_out["x"])
    assert list(held_out_share(dataset, "25%", "train")["x"]) == list(held_out["x"])
    assert list(split_at_random(dataset, 10, "train")[1]["x"]) == list(held_out["x"])  # a count of 10 is the same share
    with pytest.raises(ValueError, match=r"would hold out 40 of the 40 images of split 'train', leaving none"):
        split_at_random(dataset, 40, "train")
    with pytest.raises(ValueError, match=r"'test' is not a share \(0.05, 5%\) or a count \(500\)"):
        held_out_share(dataset, "test", "train")


def test_a_data_source_of_held_out_images_is_keyed_by_its_share():
    """A reference or bits/dim source limited to the held-out images says so in its identity (so its
    cached statistics and bound terms are its own); one without keeps the identity it had."""
    plain = DataSource.parse("bundled", "train")
    held = DataSource("bundled", "bundled", "train", held_out="5%")
    assert "held_out" not in plain.identity() and held.identity()["held_out"] == "5%"
    assert list(held.load()["label"]) == list(held_out_share(plain.load(), "5%", "train")["label"])
    assert len(held.load()) == 500


def test_validation_rows_and_bpd_held_out_are_checked_before_any_work():
    """Refused with the options' other problems, naming the option and what it takes."""
    with pytest.raises(ValueError, match=re.escape("--validation_rows 'first' is not one of: random, last.")):
        TrainingConfig(validation_split="0.1", validation_rows="first").validate()
    TrainingConfig(validation_split="0.1", validation_rows="last").validate()
    with pytest.raises(ValueError, match=re.escape("--bpd_held_out '150%' is not a share between 0 and 1")):
        EvaluationConfig(model="m", metrics="bpd", bpd_held_out="150%").validate()
    with pytest.raises(ValueError, match=re.escape("--bpd_held_out picks the images of the bits/dim: add bpd to --metrics")):
        EvaluationConfig(model="m", metrics="fid", bpd_held_out="5%").validate()
    EvaluationConfig(model="m", metrics="bpd", bpd_held_out="5%").validate()
