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
  smallest integer with beta(slots, r) >= T (Gruslys et al. 2016 apply it to BPTT). The reverse
  loop computes each next action of that schedule in closed form as it runs (`Schedule.move`), in a
  loop of fixed length, so nothing is built per step and the loop can be differentiated again.
- `remat=Invert(block)` keeps no carry at all, for steps that declare an inverse: the reverse scan
  rebuilds each block's starting carry from its final one by running the inverse over the block's
  steps backwards (the final carry being the forward pass's), then reverses the block as under
  `Every`: memory O(block), time one extra pass (the inverse) beyond storing every step, since an
  inverse that also returns the step's residuals spares the block's recomputation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

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
# Binomial's default unit lets each unit be re-run at most this many times.
_BINOMIAL_REPETITIONS = 2
# Rows (block steps x batch) of a block under remat=Invert(): half of _TARGET_ROWS, since the block's
# temporaries are all that Invert() keeps beside the carry (an invertible cell's carry holds a buffer
# that grows with T). revgru / revlstm, T=4096, B=8, H=128, 2 CPU cores, CPU time: blocks of 16, 32
# and 64 steps took 1.27-1.29x remat=None's time (revlstm: 1.48, 1.46, 1.35x) with 2.8, 3.6 and 5.4 MB
# of temporaries (revlstm: 5.3, 6.7, 9.6 MB), against remat="sqrt"'s 4.5 MB (revlstm: 8.0 MB).
_INVERT_ROWS = 256
# A binomial schedule runs one unit per iteration of an int32-counted loop.
_MOST_STEPS = 2**31 - 1


class Binomial(NamedTuple):
    """`remat=Binomial(slots)`: the optimal recomputation schedule for `slots` stored carries.

    Memory: `slots` carries, plus one unit's residuals while it is reversed. The default unit
    is as short as lets each unit be re-run at most twice (`ceil(T / C(slots + 2, 2))` steps, and
    at most the engine's usual block), so memory falls as `slots` grows: about
    `slots * carry + 2 T / slots**2 * residuals per step`.

    Attributes:
      slots: carries kept at once (the initial one included), >= 1.
      block: steps per unit of the schedule; each unit is reversed as one block (its residuals
        recomputed, its parameter gradients as matrix products). None: derived from `slots` and T
        as above. `block=1` is the classic step-level schedule.

    Gradients, and their own derivatives (`jax.hessian`, grad of grad), equal those of
    `remat=None` up to float rounding, with every other option.
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


class Invert(NamedTuple):
    """`remat=Invert()`: keep no carry; rebuild each one from the next with the step's inverse.

    For steps that declare `inverse(params, carry_next, x) -> carry` (`jaxbptt.invertible`, the cells
    `jaxbptt.revgru` and `jaxbptt.revlstm`, `jaxbptt.coupled`); any other step is refused with a
    `ValueError`. The forward pass keeps only the final carry. The reverse scan walks the blocks
    backwards: it rebuilds the block's starting carry from its end carry by running the inverse over
    the block's steps backwards, then reverses the block as under `Every` (its residuals recomputed,
    or returned by the inverse itself where the kernel's inverse gives them, as the built-in
    reversible cells' do). Memory: the final carry and one block's residuals, whatever T.

    Attributes:
      block: steps per block. None: the fewest steps whose parameter products have about 256 rows
        (steps x batch rows; half of `remat=None`'s blocks, since a block's temporaries are all that
        Invert() keeps beside the carry), and at most T / 8 steps.

    Gradients equal those of `remat=None` to the extent that the inverse is exact: bit for bit for
    `revgru` and `revlstm`, up to rounding for `coupled`. Composes with every other option.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.revgru(8, max_steps=400), 1)
      >>> params, xs = model.init(jax.random.key(0), 3), jnp.ones((400, 2, 3))
      >>> loss = lambda y, t: jnp.sum((y - t) ** 2)
      >>> f = jb.value_and_grad(model.step, loss, remat=jb.Invert())
      >>> (value, final), grads = f(params, model.initial_carry((2,)), xs, jnp.zeros((400, 2, 1)))
      >>> grads["cell"]["W_g1"].shape
      (4, 4)
    """

    block: Optional[int] = None


class Sqrt(NamedTuple):
    """`remat=Sqrt()`: `Every(ceil(sqrt(T)))`, O(sqrt(T)) carries kept (the same as `remat="sqrt"`)."""


def canonical_remat(remat):
    """The policy as a value: `None`, `Every(s)` (also spelled `s`), `Sqrt()` (also `"sqrt"`) or
    `Binomial`."""
    if isinstance(remat, int) and not isinstance(remat, bool):
        return Every(remat)
    if isinstance(remat, str) and remat == "sqrt":
        return Sqrt()
    return remat


class Schedule(NamedTuple):
    """A binomial (revolve) schedule reversing `units` units with `slots` snapshots, one unit of work
    per loop iteration: `steps` iterations, `advances` of which re-run a unit forward and `units`
    reverse one. The loop walks it with `start` and `move`, which compute each iteration's action
    from a small `Cursor` in closed form, so nothing proportional to the sequence is built."""

    units: int
    slots: int
    tail: bool  # the last unit is shorter and reversed by its own branch
    advances: int  # units re-run forward (the recomputation count)

    @property
    def steps(self) -> int:
        return self.advances + self.units

    def start(self, xp=jnp) -> "Cursor":
        """The cursor before the first iteration: at unit 0, whose carry is snapshot 0."""
        zero = xp.asarray(0, xp.int32)
        return Cursor(zero, xp.asarray(self.units, xp.int32), zero, xp.zeros((self.slots,), xp.int32))

    def move(self, cursor: "Cursor", xp=jnp) -> tuple["Move", "Cursor"]:
        """The next iteration's action and the cursor after it (`xp=numpy` simulates it on the host).

        The recursion it unrolls: to reverse units [a, fine) from the carry at a, held in the top
        snapshot with s snapshots free from there on, advance k units (Griewank's split), store that
        carry, reverse [a + k, fine) with s - 1 snapshots, then [a, a + k) with s. With s = 1 it
        re-advances from a to each unit in turn. A reversed unit that is its frame's first pops it.
        """
        pos, fine, top, stack = cursor
        first, free = stack[top], self.slots - top
        n = fine - first
        table = _binomials(self.units)
        beta = functools.partial(_beta_lookup, table, self.units + 1, xp)
        s = xp.maximum(free, 2)  # the split is used only where free >= 2
        k = _split(n, s, _search_repetitions(beta, table.shape[1], n, s, xp), beta, xp.where)
        target = xp.where(n == 1, first, xp.where(free == 1, fine - 1, first + k))
        restore = pos > target
        pos = xp.where(restore, first, pos)
        reverse = pos == target
        store = ~reverse & (pos + 1 == target) & (free > 1)
        after = xp.where(reverse, pos, pos + 1)
        top_after = top + store.astype(xp.int32) - (reverse & (pos == first)).astype(xp.int32)
        stack = xp.where(store & (xp.arange(self.slots) == top + 1), after, stack)
        move = Move(restore, reverse, store, pos, top, xp.minimum(top + 1, self.slots - 1))
        return move, Cursor(after, xp.where(reverse, pos, fine), top_after, stack)


class Cursor(NamedTuple):
    """Where a `Schedule` stands: int32 scalars and one int32 vector."""

    pos: Any  # the unit whose starting carry is the current carry
    fine: Any  # units [fine, units) are reversed
    top: Any  # the newest snapshot in use
    stack: Any  # shape=(slots,): the unit whose starting carry each snapshot holds


class Move(NamedTuple):
    """One iteration: if `restore`, the carry becomes snapshot `source` first; then the unit `unit`
    is reversed (`reverse`) or advanced over; if `store`, the carry reached goes into snapshot
    `destination`."""

    restore: Any
    reverse: Any
    store: Any
    unit: Any
    source: Any
    destination: Any


class Plan(NamedTuple):
    """A static schedule: groups of equal-length blocks covering [0, T) in order."""

    length: int
    groups: tuple[tuple[int, int, int], ...]  # (first step, block length, number of blocks)
    store: bool  # True: keep every step's residuals; False: keep block-start carries only
    schedule: Optional[Schedule] = None  # a binomial schedule over the blocks (nothing kept forward)
    invert: bool = False  # remat=Invert(): nothing kept forward but the final carry; blocks rebuilt by the inverse


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
    policy = canonical_remat(remat)
    if policy is None or isinstance(policy, Sqrt):
        return
    if isinstance(policy, Binomial):
        if isinstance(policy.slots, bool) or not isinstance(policy.slots, int) or policy.slots < 1:
            raise ValueError(f"remat=Binomial(slots) needs an int slots >= 1 (carries kept); got slots={policy.slots!r}.")
        if policy.block is not None and (isinstance(policy.block, bool) or not isinstance(policy.block, int)
                                         or policy.block < 1):
            raise ValueError(f"remat=Binomial(slots, block) needs block None or an int >= 1; got block={policy.block!r}.")
        return
    if isinstance(policy, Invert):
        if policy.block is not None and (isinstance(policy.block, bool) or not isinstance(policy.block, int)
                                         or policy.block < 1):
            raise ValueError(f"remat=Invert(block) needs block None or an int >= 1 (steps per block); got "
                             f"block={policy.block!r}.")
        return
    if not isinstance(policy, Every):
        raise TypeError(
            f"remat must be None, a positive int or jaxbptt.Every(steps), 'sqrt' or jaxbptt.Sqrt(), "
            f"jaxbptt.Binomial(slots) or jaxbptt.Invert(); got {remat!r} of type {type(remat).__name__}."
        )
    if isinstance(policy.steps, bool) or not isinstance(policy.steps, int) or policy.steps < 1:
        raise ValueError(f"remat must be a positive int or jaxbptt.Every(steps) with an int steps >= 1 (checkpoint "
                         f"every s steps); got remat={remat!r}.")


def make_plan(length: int, remat, rows_per_step: int, elements_per_step: int = 0, store: Optional[bool] = None) -> Plan:
    """The schedule for a sequence of `length` steps whose carry has `rows_per_step` batch rows and
    `elements_per_step` elements in all. With `remat=None`, `store=False` keeps only each block's
    starting carry and recomputes the block before reversing it (what is cheaper to recompute than
    to store); `store=None` or True keeps every step's residuals."""
    validate_remat(remat)
    remat = canonical_remat(remat)
    by_elements = _BLOCK_ELEMENTS // elements_per_step if elements_per_step else 0
    most = max(math.ceil(_TARGET_ROWS / max(rows_per_step, 1)), by_elements)
    block = min(most, math.ceil(length / _MIN_BLOCKS))
    block = _even_block(length, max(block, 1))
    if remat is None:
        return Plan(length, _groups(length, block), store=store is not False)
    if isinstance(remat, Binomial):
        # The binomial schedule reverses C(slots + r, r) units with each unit re-run at most r times:
        # r = 2 keeps the re-runs at about two forward passes in all.
        fitted = math.ceil(length / math.comb(remat.slots + _BINOMIAL_REPETITIONS, _BINOMIAL_REPETITIONS))
        groups = _groups(length, remat.block or min(block, fitted))
        units = sum(count for _, _, count in groups)
        schedule = binomial_schedule(units, remat.slots, tail=len(groups) > 1)
        if schedule.steps > _MOST_STEPS:
            raise ValueError(
                f"remat={remat!r} on {length} steps would run {schedule.steps} blocks of {groups[0][1]} steps "
                f"({schedule.advances} re-run), more than one loop can count ({_MOST_STEPS}); give it more "
                f"slots or a larger block."
            )
        return Plan(length, groups, store=False, schedule=schedule)
    if isinstance(remat, Invert):
        steps = remat.block or _even_block(length, max(1, min(math.ceil(_INVERT_ROWS / max(rows_per_step, 1)),
                                                           math.ceil(length / _MIN_BLOCKS))))
        return Plan(length, _groups(length, steps), store=False, invert=True)
    segment = math.ceil(math.sqrt(length)) if isinstance(remat, Sqrt) else remat.steps
    return Plan(length, _groups(length, segment), store=False)


def _beta(s: int, r: int) -> int:
    """beta(s, r) = C(s + r, s): the most units s snapshots reverse with each unit advanced at most r
    times (Griewank 1992); 0 when s or r is negative."""
    return math.comb(s + r, s) if s >= 0 and r >= 0 else 0


def _repetitions(n: int, s: int) -> int:
    """The smallest r with beta(s, r) >= n."""
    if s == 1:
        return max(n - 1, 0)
    high = 1
    while _beta(s, high) < n:
        high *= 2
    low = 0
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if _beta(s, mid) >= n else (mid + 1, high)
    return high


def binomial_cost(n: int, slots: int) -> int:
    """The fewest unit steps re-run to reverse n units with `slots` stored states (the initial one
    included): r n - beta(slots + 1, r - 1), r the smallest integer with beta(slots, r) >= n."""
    if n <= 1:
        return 0
    if slots == 1:
        return n * (n - 1) // 2
    r = _repetitions(n, slots)
    return r * n - _beta(slots + 1, r - 1)


def _split(n, s, r, beta, where):
    """Griewank and Walther's rule (revolve, 2000): the units to advance from a snapshot before
    storing the next, for n units, s >= 2 snapshots and r = the smallest with beta(s, r) >= n. Any k
    with k + cost(k, s) + cost(n - k, s - 1) = cost(n, s) is optimal; this one is in closed form."""
    b1, b2, b3, b4 = beta(s, r - 1), beta(s - 1, r - 1), beta(s - 2, r - 1), beta(s, r - 2)
    k = where(n <= b1 + b3, b4, where(n >= b1 + b2 + b3, b1, n - b2 - b3))
    return where(k < 1, 1, k)


def binomial_split(n: int, s: int) -> int:
    """`_split` on Python ints, exactly (what the loop computes from its table)."""
    return _split(n, s, _repetitions(n, s), _beta, lambda c, a, b: a if c else b)


@functools.lru_cache(maxsize=8)
def _binomials(units: int) -> np.ndarray:
    """beta(m, M) for 0 <= m < rows and 0 <= M < cols, capped at units + 1, with rows and cols
    chosen so that every beta(m, M) with 2 <= m <= M outside the table exceeds `units`:
    C(2 rows, rows) > units and C(cols + 2, 2) > units (about 11 x 1,400 entries at 10^6 units)."""
    rows = 2
    while _beta(rows, rows) <= units:
        rows += 1
    cols = math.isqrt(2 * units)
    while _beta(2, cols) > units and cols > 0:
        cols -= 1
    while _beta(2, cols) <= units:
        cols += 1
    table = np.ones((rows, cols), np.int64)
    for m in range(1, rows):  # Pascal: beta(m, M) = sum of beta(m - 1, j) for j <= M
        table[m] = np.minimum(np.cumsum(table[m - 1]), units + 1)
    return table.astype(np.int32)


def _beta_lookup(table: np.ndarray, cap: int, xp, s, r):
    """beta(s, r) for int arrays from `_binomials`, capped at `cap` (beta is symmetric in s and r)."""
    rows, cols = table.shape
    low, high = xp.minimum(s, r), xp.maximum(s, r)
    inside = xp.asarray(table)[xp.clip(low, 0, rows - 1), xp.clip(high, 0, cols - 1)]
    inside = xp.where((low < rows) & (high < cols), inside, cap)
    return xp.where(low < 0, 0, xp.where(low == 0, 1, xp.where(low == 1, xp.minimum(high + 1, cap), inside)))


def _search_repetitions(beta, cols: int, n, s, xp):
    """The smallest r with beta(s, r) >= n <= beta(2, cols), by bisection (static iteration count)."""
    low, high = xp.zeros_like(n), xp.zeros_like(n) + cols
    for _ in range(cols.bit_length()):
        mid = (low + high) // 2
        enough = beta(s, mid) >= n
        low, high = xp.where(enough, low, mid + 1), xp.where(enough, mid, high)
    return high


def binomial_schedule(units: int, slots: int, tail: bool = False) -> Schedule:
    """The revolve schedule reversing `units` units with `slots` stored states (Griewank's binomial
    checkpointing). With `tail`, the last unit is shorter."""
    slots = max(1, min(slots, units))
    return Schedule(units, slots, tail, binomial_cost(units, slots))
