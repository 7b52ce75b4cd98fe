"""Seeds derived from several numbers, for reproducible and resumable random streams."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy ``SeedSequence(parts)``), so that nearby
    tuples such as ``(seed, batch)`` and ``(seed, batch + 1)`` give unrelated random streams."""
    state = np.random.SeedSequence([int(part) for part in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))
