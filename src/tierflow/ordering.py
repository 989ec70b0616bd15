"""Selections whose result is the same on every machine.

``np.argpartition`` (and ``np.argsort`` with the default kind) leave the choice among equal keys, and the order
of what they return, to the selection algorithm, and numpy picks the algorithm by the CPU's vector instructions:
a run that selects with them can give other figures on another machine. These break ties by position.
"""

from __future__ import annotations

import numpy as np


def smallest_first(keys: np.ndarray, n: int) -> np.ndarray:
    """Indices (along the last axis) of the ``n`` smallest keys of each row, smallest first, equal keys by
    position: ``np.argsort(keys, axis=-1, kind="stable")[..., :n]``, in linear time (a partition finds the n-th
    smallest key, and only the keys up to it are sorted). ``keys`` must hold no NaN."""
    m = keys.shape[-1]
    n = min(n, m)
    if n == 0:
        return np.empty(keys.shape[:-1] + (0,), dtype=np.intp)
    if n == m:
        return np.argsort(keys, axis=-1, kind="stable")
    kth = np.partition(keys, n - 1, axis=-1)[..., n - 1 : n]  # the n-th smallest key: one value, however found
    below = keys < kth
    tied = keys == kth
    room = n - below.sum(axis=-1, keepdims=True)  # the keys equal to it that are taken: the first ones
    chosen = below | (tied & (np.cumsum(tied, axis=-1) <= room))
    columns = (np.flatnonzero(chosen) % m).reshape(keys.shape[:-1] + (n,))  # n per row, by position
    order = np.argsort(np.take_along_axis(keys, columns, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(columns, order, axis=-1)
