"""Memory policies: which per-step values the forward pass keeps for the reverse scan.

Time is cut into blocks. The reverse scan walks the blocks backwards; within a block it runs the
carry-adjoint loop, then forms the block's parameter gradients as large matrix products. A policy
decides what the forward pass keeps per block:

- `remat=None` keeps every step's residuals; blocks only bound the size of the per-block
  temporaries (parameter-gradient operands), so they are sized for matrix-product efficiency.
- `remat=s` keeps the carry entering every s-th step and recomputes each block of s steps (one extra
  forward pass in total) just before its reverse loop: memory O(T / s + s) carries.
- `remat="sqrt"` is `remat=ceil(sqrt(T))`, the O(sqrt(T)) memory of Chen et al. (2016).
"""

from __future__ import annotations

import math
from typing import NamedTuple

# Rows (block steps x batch) that make the per-block parameter products efficient, and the most
# blocks' worth of temporaries per sequence: per-block temporaries stay a small fraction of what is
# stored for the whole sequence (both measured on CPU, see benchmarks).
_TARGET_ROWS = 512
_MIN_BLOCKS = 8


class Plan(NamedTuple):
    """A static schedule: groups of equal-length blocks covering [0, T) in order."""

    length: int
    groups: tuple[tuple[int, int, int], ...]  # (first step, block length, number of blocks)
    store: bool  # True: keep every step's residuals; False: keep block-start carries only


def _even_block(length: int, block: int) -> int:
    """The largest divisor of `length` in [block / 2, block] (one group of blocks, no tail), else
    `block`."""
    for candidate in range(block, (block + 1) // 2 - 1, -1):
        if length % candidate == 0:
            return candidate
    return block


def _groups(length: int, block: int) -> tuple[tuple[int, int, int], ...]:
    block = max(1, min(block, length))
    full, tail = divmod(length, block)
    groups = [(0, block, full)]
    if tail:
        groups.append((full * block, tail, 1))
    return tuple(groups)


def validate_remat(remat) -> None:
    if remat is None or remat == "sqrt":
        return
    if isinstance(remat, bool) or not isinstance(remat, int):
        raise TypeError(
            f"remat must be None, a positive int (checkpoint every s steps) or 'sqrt'; "
            f"got {remat!r} of type {type(remat).__name__}."
        )
    if remat < 1:
        raise ValueError(f"remat must be a positive int (checkpoint every s steps); got remat={remat}.")


def make_plan(length: int, remat, rows_per_step: int) -> Plan:
    """The schedule for a sequence of `length` steps whose carry has `rows_per_step` batch rows."""
    validate_remat(remat)
    if remat is None:
        block = min(math.ceil(_TARGET_ROWS / max(rows_per_step, 1)), math.ceil(length / _MIN_BLOCKS))
        return Plan(length, _groups(length, _even_block(length, max(block, 1))), store=True)
    segment = math.ceil(math.sqrt(length)) if remat == "sqrt" else remat
    return Plan(length, _groups(length, segment), store=False)
