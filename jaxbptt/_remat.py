"""Memory policies: which per-step values the forward pass keeps for the reverse scan.

Time is cut into blocks. The reverse scan walks the blocks backwards; within a block it runs the
carry-adjoint loop, then forms the block's parameter gradients as large matrix products. A policy
decides what the forward pass keeps per block:

- `remat=None` keeps every step's residuals; blocks only bound the size of the per-block
  temporaries (parameter-gradient operands), so they are sized for matrix-product efficiency.
- `remat=s` keeps the carry entering every s-th step and recomputes each block of s steps (one extra
  forward pass in total) just before its reverse loop: memory O(T / s + s) carries.
- `remat=Every(s)` is `remat=s`, `remat=Sqrt()` is `remat="sqrt"`.
- `remat="sqrt"` is `remat=ceil(sqrt(T))`, the O(sqrt(T)) memory of Chen et al. (2016).
- `remat=Binomial(slots)` keeps at most `slots` carries and reverses with Griewank's binomial
  schedule (revolve; Griewank 1992, Griewank & Walther 2000), the fewest recomputed steps for that
  memory: r T - beta(slots + 1, r - 1) steps re-run, with beta(s, r) = C(s + r, s) and r the
  smallest integer with beta(slots, r) >= T (Gruslys et al. 2016 apply it to BPTT).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

# Rows (block steps x batch) that make the per-block parameter products efficient, and the most
# blocks' worth of temporaries per sequence: per-block temporaries stay a small fraction of what is
# stored for the whole sequence (both measured on CPU, see benchmarks).
_TARGET_ROWS = 512
_MIN_BLOCKS = 8
# Carry elements (block steps x batch x features) a block may reach when that is more than
# _TARGET_ROWS rows: each block costs a fixed epilogue (output cotangents, parameter products, loop
# start), which at small widths outweighs its work. 2**17 (512 KiB of float32 per temporary) keeps
# the blocks of the wide configurations unchanged and lets narrow ones (H = 32-128 at batch 64) run
# 8-12 blocks instead of 20 (LSTM, T=100, B=64, H=32, 2 CPU cores: 0.79x autodiff's time against
# 1.07x with 20 blocks, one interleaved run on a loaded machine).
_BLOCK_ELEMENTS = 1 << 17


class Binomial(NamedTuple):
    """`remat=Binomial(slots)`: the optimal recomputation schedule for `slots` stored carries.

    Attributes:
      slots: carries kept at once (the initial one included), >= 1.
      block: steps per unit of the schedule; each unit is reversed as one block (its residuals
        recomputed, its parameter gradients as matrix products). None: the engine's block size.
        `block=1` is the classic step-level schedule.
    """

    slots: int
    block: Optional[int] = None


class Every(NamedTuple):
    """`remat=Every(steps)`: keep the carry entering every `steps`-th step and recompute each block
    of `steps` steps before reversing it (the same as `remat=steps`).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.elman(4)
      >>> params, xs = cell.init(jax.random.key(0), 2), jnp.ones((12, 2), jnp.float32)
      >>> grad = lambda remat: jax.grad(lambda p: jnp.sum(jb.unroll(cell.step, p, cell.initial_carry(), xs,
      ...                                                          remat=remat)[1]))(params)["W_hh"]
      >>> bool(jnp.allclose(grad(jb.Every(4)), grad(None), rtol=1e-5)), bool(jnp.allclose(grad(jb.Sqrt()), grad(None), rtol=1e-5))
      (True, True)
    """

    steps: int


class Sqrt(NamedTuple):
    """`remat=Sqrt()`: `Every(ceil(sqrt(T)))`, O(sqrt(T)) carries kept (the same as `remat="sqrt"`)."""


def _canonical(remat):
    """The int / "sqrt" spelling of a policy value (the engine's own)."""
    if isinstance(remat, Every):
        return remat.steps
    return "sqrt" if isinstance(remat, Sqrt) else remat


class Schedule(NamedTuple):
    """A revolve schedule over units: parallel tuples of ops and their two arguments."""

    ops: tuple[int, ...]
    first: tuple[int, ...]
    second: tuple[int, ...]
    slots: int
    advances: int  # units re-run forward (the recomputation count)


ADVANCE, STORE, RESTORE, REVERSE, REVERSE_TAIL = range(5)


class Plan(NamedTuple):
    """A static schedule: groups of equal-length blocks covering [0, T) in order."""

    length: int
    groups: tuple[tuple[int, int, int], ...]  # (first step, block length, number of blocks)
    store: bool  # True: keep every step's residuals; False: keep block-start carries only
    schedule: Optional[Schedule] = None  # a binomial schedule over the blocks (nothing kept forward)


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
    remat = _canonical(remat)
    if remat is None or (isinstance(remat, str) and remat == "sqrt"):
        return
    if isinstance(remat, Binomial):
        if isinstance(remat.slots, bool) or not isinstance(remat.slots, int) or remat.slots < 1:
            raise ValueError(f"remat=Binomial(slots) needs an int slots >= 1 (carries kept); got slots={remat.slots!r}.")
        if remat.block is not None and (not isinstance(remat.block, int) or remat.block < 1):
            raise ValueError(f"remat=Binomial(slots, block) needs block None or an int >= 1; got block={remat.block!r}.")
        return
    if isinstance(remat, bool) or not isinstance(remat, int):
        raise TypeError(
            f"remat must be None, a positive int (checkpoint every s steps), 'sqrt' or jaxbptt.Binomial(slots); "
            f"got {remat!r} of type {type(remat).__name__}."
        )
    if remat < 1:
        raise ValueError(f"remat must be a positive int (checkpoint every s steps); got remat={remat}.")


def make_plan(length: int, remat, rows_per_step: int, elements_per_step: int = 0) -> Plan:
    """The schedule for a sequence of `length` steps whose carry has `rows_per_step` batch rows and
    `elements_per_step` elements in all."""
    validate_remat(remat)
    remat = _canonical(remat)
    by_elements = _BLOCK_ELEMENTS // elements_per_step if elements_per_step else 0
    most = max(math.ceil(_TARGET_ROWS / max(rows_per_step, 1)), by_elements)
    block = min(most, math.ceil(length / _MIN_BLOCKS))
    block = _even_block(length, max(block, 1))
    if remat is None:
        return Plan(length, _groups(length, block), store=True)
    if isinstance(remat, Binomial):
        groups = _groups(length, remat.block or block)
        units = sum(count for _, _, count in groups)
        return Plan(length, groups, store=False, schedule=binomial_schedule(units, remat.slots, tail=len(groups) > 1))
    segment = math.ceil(math.sqrt(length)) if remat == "sqrt" else remat
    return Plan(length, _groups(length, segment), store=False)


def _beta(s: int, r: int) -> int:
    return math.comb(s + r, s)


def _repetitions(n: int, s: int) -> int:
    r = 0
    while _beta(s, r) < n:
        r += 1
    return r


def binomial_cost(n: int, slots: int) -> int:
    """The fewest unit steps re-run to reverse n units with `slots` stored states (the initial one
    included): r n - beta(slots + 1, r - 1), r the smallest integer with beta(slots, r) >= n."""
    if n <= 1:
        return 0
    if slots == 1:
        return n * (n - 1) // 2
    r = _repetitions(n, slots)
    return r * n - _beta(slots + 1, r - 1)


def _binomial_split(n: int, s: int) -> int:
    """Where to place the next checkpoint: an optimal first advance for n units and s slots."""
    r = _repetitions(n, s)
    candidates = {base + d for j in range(r + 2) for base in (_beta(s, j), n - _beta(s - 1, j)) for d in (-1, 0, 1)}
    cost = lambda k: k + binomial_cost(n - k, s - 1) + binomial_cost(k, s)
    k = min((k for k in candidates if 1 <= k < n), key=lambda k: (cost(k), k))
    if cost(k) != binomial_cost(n, s):  # never seen; the exhaustive search keeps the schedule optimal
        k = min(range(1, n), key=cost)
    return k


def binomial_schedule(units: int, slots: int, tail: bool = False) -> Schedule:
    """The revolve schedule reversing `units` units with `slots` stored states (Griewank's binomial
    checkpointing). With `tail`, the last unit is shorter and reversed by its own op."""
    slots = max(1, min(slots, units))
    ops, first, second = [], [], []

    def emit(op, a=0, b=0):
        ops.append(op)
        first.append(a)
        second.append(b)

    def reverse_unit(u):
        emit(REVERSE_TAIL if tail and u == units - 1 else REVERSE)

    def reverse(a, b, s, snap):
        """Reverse units [a, b) with the state at a current and kept in snapshot `snap`, using
        snapshots snap .. snap + s - 1."""
        if b - a == 1:
            reverse_unit(a)
        elif s == 1:
            for u in range(b - 1, a - 1, -1):
                emit(RESTORE, snap, a)
                if u > a:
                    emit(ADVANCE, u - a)
                reverse_unit(u)
        else:
            k = _binomial_split(b - a, s)
            emit(ADVANCE, k)
            emit(STORE, snap + 1)
            reverse(a + k, b, s - 1, snap + 1)
            emit(RESTORE, snap, a)
            reverse(a, a + k, s, snap)

    emit(STORE, 0)
    reverse(0, units, slots, 0)
    advances = sum(a for op, a in zip(ops, first) if op == ADVANCE)
    return Schedule(tuple(ops), tuple(first), tuple(second), slots, advances)
