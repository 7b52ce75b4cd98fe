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


def read_json_object(path: str | Path, fix: str = DEFAULT_FIX) -> dict[str, Any]:
    """The JSON object in ``path``. A file that is empty, not JSON (``json.loads`` fails) or JSON
    but not an object raises a ValueError naming the file, where its JSON breaks, and ``fix``."""
    path = Path(path)
    text = path.read_bytes()
    if not text.strip():
        raise ValueError(f"{path} is empty: {fix}.")
    try:
        value = json.loads(text)
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({error}): {fix}.") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object: {fix}.")
    return value
