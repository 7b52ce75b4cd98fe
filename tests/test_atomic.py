"""Atomic writes: the final name holds the complete new version or the old one, never a partial one."""

import numpy as np
import pytest
from PIL import Image

from ddpm_pipeline.atomic import atomic_path, move_into_place, temporary_sibling


def test_temporary_sibling_is_hidden_and_keeps_the_suffix(tmp_path):
    assert temporary_sibling(tmp_path / "000001.png") == tmp_path / ".000001.tmp.png"
    assert temporary_sibling(tmp_path / "checkpoint-12") == tmp_path / ".checkpoint-12.tmp"
    assert temporary_sibling(tmp_path / "stats.npz", "old") == tmp_path / ".stats.old.npz"


def test_a_file_appears_complete_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "sub" / "report.json"
    with atomic_path(path) as partial:
        partial.write_text("first")
        assert not path.exists()  # nothing under the final name until the block ends
    with atomic_path(path) as partial:
        partial.write_text("second")
        assert path.read_text() == "first"
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failed_write_leaves_the_old_version_and_no_partial(tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, a=np.ones(3))
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as partial:
            np.savez(partial, a=np.zeros(3))
            raise RuntimeError("disk full")
    assert np.load(path)["a"].tolist() == [1, 1, 1] and sorted(p.name for p in tmp_path.iterdir()) == ["weights.npz"]


def test_writers_that_pick_the_format_from_the_suffix(tmp_path):
    # np.savez appends .npz and PIL picks PNG from the name: the temporary name keeps the suffix
    with atomic_path(tmp_path / "stats.npz") as partial:
        np.savez(partial, mu=np.arange(2))
    with atomic_path(tmp_path / "sample.png") as partial:
        Image.new("L", (2, 2), 7).save(partial)
    assert np.load(tmp_path / "stats.npz")["mu"].tolist() == [0, 1]
    assert Image.open(tmp_path / "sample.png").format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.png", "stats.npz"]


def test_a_folder_replaces_an_older_folder(tmp_path):
    folder = tmp_path / "snapshot-1min"
    folder.mkdir()
    (folder / "old.bin").write_bytes(b"old")
    with atomic_path(folder) as staging:
        staging.mkdir()
        (staging / "new.bin").write_bytes(b"new")
        assert (folder / "old.bin").is_file()
    assert [p.name for p in folder.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot-1min"]  # the old one is gone, no .old left


def test_move_into_place_clears_an_old_folder_left_by_a_crash(tmp_path):
    # a crash between the two renames of an earlier move left `.name.old`; the next move clears it
    target, source = tmp_path / "checkpoint-4", tmp_path / ".checkpoint-4.tmp"
    for folder in (target, source, temporary_sibling(target, "old")):
        folder.mkdir()
    (source / "model.safetensors").write_bytes(b"new")
    move_into_place(source, target)
    assert (target / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_a_file_never_replaces_a_folder(tmp_path):
    """A report written to a folder's name (eval_metrics.py --output outputs/my-run) is refused,
    naming the folder: the folder keeps all it holds, and no partial file is left beside it."""
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "model_index.json").write_text("{}")
    with pytest.raises(IsADirectoryError, match=f"{run} is a folder, which writing a file there would delete"):
        with atomic_path(run) as partial:
            partial.write_text('{"fid": 1}')
    assert (run / "model_index.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-run"]
