"""Deterministic example order, so a resumed run continues exactly where it stopped.

A position in the data is ``(epoch, offset)``: the run has consumed the first ``offset``
indices of ``epoch_order(n, seed, epoch, shuffle)``. The order depends on nothing else
(not on the number of ranks or the batch size), so a checkpoint stores those two
integers and resume recomputes the order and skips ``offset`` indices.
"""

from __future__ import annotations

import hashlib
from typing import List, Tuple

import torch


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, different for every tuple (order counts)."""
    # seed + epoch would make (seed=1, epoch=0) and (seed=0, epoch=1) identical
    digest = hashlib.sha256(":".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """The order of example indices ``0..n-1`` in ``epoch``: a permutation drawn from a
    ``torch.Generator`` seeded by (seed, epoch), or ``range(n)`` without shuffling."""
    if n < 0 or epoch < 0:
        raise ValueError(f"need n >= 0 and epoch >= 0, got n={n}, epoch={epoch}")
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(n, generator=generator).tolist()


def split_holdout(n: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Split ``0..n-1`` into (train, valid) indices, ``round(n * fraction)`` (at least 1)
    of them for validation, chosen by ``seed`` and independent of any epoch order.
    Both lists are sorted. ``fraction == 0`` gives no validation examples."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.valid_fraction={fraction} must be in [0, 1)")
    if fraction == 0.0:
        return list(range(n)), []
    n_valid = max(1, round(n * fraction))
    if n_valid >= n:
        raise ValueError(f"data.valid_fraction={fraction} leaves no training examples out of {n}")
    generator = torch.Generator().manual_seed(mix_seed(seed, -1))
    picked = torch.randperm(n, generator=generator)[:n_valid]
    valid = sorted(picked.tolist())
    chosen = set(valid)
    return [i for i in range(n) if i not in chosen], valid
