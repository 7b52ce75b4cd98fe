"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Everything this package writes that a later run reads back (checkpoints, snapshots, sample PNGs,
reference statistics, reports, weights) is written under a temporary hidden name beside its final
one and renamed into place (``os.replace``, atomic within one file system), so a crash — even a
SIGKILL mid-write — leaves the previous version or nothing, never a truncated one. Checkpoints,
and the models a run saves (its pipeline, snapshots, exports), which a long run cannot do without, are
also flushed to the disk before their rename (:func:`flush_to_disk`), so that a power cut or a kernel
crash right after it cannot leave them named but empty.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def flush_to_disk(path: str | Path) -> None:
    """``fsync`` a file, or a folder with every file and folder below it: their data on the disk,
    not only in the page cache, so that a rename that follows names complete files even after a
    power cut or a kernel crash (without it, a file system may keep the rename and lose the data,
    leaving files of zeros or of no bytes under the final name). A file's failure (``EIO``, or
    ``ENOSPC`` from a file system that allocates on write-back) is raised; folders are synced where
    the platform allows it."""
    path = Path(path)
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and not child.is_symlink():
                _fsync(child)
        for folder in [*sorted(child for child in path.rglob("*") if child.is_dir()), path]:
            flush_folder_entries(folder)
    else:
        _fsync(path)


def flush_folder_entries(folder: str | Path) -> None:
    """``fsync`` a folder itself: the names in it (a rename into it, a file created) on the disk.
    Best effort: some platforms (Windows) and file systems cannot open or sync a folder."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync(file: Path) -> None:
    # Windows flushes (FlushFileBuffers) only a handle opened for writing; POSIX, any descriptor
    descriptor = os.open(file, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """``dir/.{stem}.{tag}{suffix}`` for ``dir/{stem}{suffix}``: hidden (skipped by Hub uploads and
    listings) and keeping the suffix, so writers that pick the format from it (PIL, ``np.savez``,
    ``torch.save``) write the same format."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{tag}{path.suffix}")


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def delete_atomically(path: Path) -> None:
    """Delete a folder (or file) so that it is gone under its name at once: renamed aside to
    ``.{name}.old`` first, then deleted, so a crash part-way never leaves a partial folder (a
    checkpoint missing some of its files) under the name a later run would read."""
    stale = temporary_sibling(path, "old")
    remove(stale)
    os.replace(path, stale)
    remove(stale)


def move_into_place(source: str | Path, target: str | Path) -> None:
    """Move ``source`` onto ``target`` atomically (``os.replace``). A folder already at ``target``
    (which ``os.replace`` cannot overwrite) is first renamed aside to ``.{name}.old`` and deleted
    only after the move, so a crash between the two renames loses no data: the old folder is then
    under that name, and ``target`` is absent rather than partial. A file never replaces a folder:
    ``IsADirectoryError``, naming it (a report written to ``--output outputs/my-run`` would delete
    the run)."""
    source, target = Path(source), Path(target)
    if target.is_dir() and not target.is_symlink():
        if not source.is_dir():
            raise IsADirectoryError(f"{target} is a folder, which writing a file there would delete with all it holds: "
                                    "nothing was written; name a file instead.")  # fmt: skip
        stale = temporary_sibling(target, "old")
        remove(stale)
        os.replace(target, stale)
        os.replace(source, target)
        shutil.rmtree(stale)
    else:
        os.replace(source, target)


@contextmanager
def atomic_path(path: str | Path, flush: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (:func:`temporary_sibling`) to write a file or a folder
    to; when the block ends without an exception it is moved onto ``path`` (:func:`move_into_place`), when it
    raises it is deleted and ``path`` is left as it was. The parent folder is created if missing.
    With ``flush``, what was written is flushed to the disk before the move (:func:`flush_to_disk`),
    and the parent folder's entries after it: for what a later run cannot do without (a model).

    Example::

        with atomic_path(output / "report.json") as partial:
            partial.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    remove(temporary)
    try:
        yield temporary
        if flush:
            flush_to_disk(temporary)
        move_into_place(temporary, path)
        if flush:
            flush_folder_entries(path.parent)
    except BaseException:
        remove(temporary)
        raise
