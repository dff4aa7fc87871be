"""Per-client seeds derived from the experiment's one seed (same config, same results)."""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """A per-client (per-autoencoder) seed derived from the experiment seed."""
    state = np.random.SeedSequence([seed, *(k & 0xFFFFFFFF for k in keys)]).generate_state(1)
    return int(state[0])
