"""Reading the JSON files a run, a pipeline or a sample folder keeps (configs, records, settings),
with an error that names the file when one cannot be read: a typo made editing it by hand, or a
file emptied or cut short (a power cut, a copy), instead of json's bare ``JSONDecodeError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: What to do about a JSON file that cannot be read, unless the caller knows better.
DEFAULT_FIX = "correct it, or restore it from a copy"


class UnreadableJSON(ValueError):
    """A JSON file that is not a JSON object: ``problem`` says how (``"is empty"``, ``"is not
    valid JSON (Expecting value: line 1 column 1 (char 0))"``, ``"holds a JSON list, not an
    object"``), and the message is ``"{path} {problem}: {fix}."``."""

    def __init__(self, path: Path, problem: str, fix: str):
        super().__init__(f"{path} {problem}: {fix}.")
        self.path, self.problem = path, problem


def read_json_object(path: str | Path, fix: str = DEFAULT_FIX) -> dict[str, Any]:
    """The JSON object in ``path``. A file that is empty, not JSON (``json.loads`` fails) or JSON
    but not an object raises an :class:`UnreadableJSON` naming the file, where its JSON breaks,
    and ``fix``."""
    path = Path(path)
    text = path.read_bytes()
    if not text.strip():
        raise UnreadableJSON(path, "is empty", fix)
    try:
        value = json.loads(text)
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise UnreadableJSON(path, f"is not valid JSON ({error})", fix) from error
    if not isinstance(value, dict):
        raise UnreadableJSON(path, f"holds a JSON {type(value).__name__}, not an object", fix)
    return value
