"""Split specs as ``datasets`` reads them (``train``, ``train[:1000]``, ``train[:10%]+test``).

Only ``datasets`` is imported here (not torch), so a command line checks its split options before
any heavy import.
"""

from __future__ import annotations

import datasets


def read_instruction(split: str, option: str = "--split", forms: str = "") -> datasets.ReadInstruction:
    """``split`` parsed as ``load_dataset(split=...)`` parses it; a spec it cannot read raises a
    ValueError that names the ``option`` it came from and the forms it can take (``forms``: more of
    them, for an option that takes others too)."""
    try:
        return datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"{option} {split!r} is not a split name or slice ({error}); e.g. train, train[:1000], "
                         f"train[:10%], train+test{forms}.") from error  # fmt: skip


def split_names(split: str) -> list[str]:
    """The split names in a split spec: ``"train[:10%]+test"`` → ``["train", "test"]``."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]
