"""Exactly invertible forgetting in fixed point, with the bits it loses kept in an integer buffer.

MacKay, Vicol, Ba and Grosse ("Reversible Recurrent Neural Networks", NeurIPS 2018) make a gated
update `h' = z * h + (1 - z) * g` invertible in finite precision:

- `h` is held in fixed point, `HIDDEN_RADIX` fractional bits (an integer `n` stands for
  `n / 2**HIDDEN_RADIX`), and the gate `z` in `FORGET_RADIX` bits (`z_n = round(z * 2**FORGET_RADIX)`);
- `z * h` is computed as `(h >> FORGET_RADIX) * z_n` exactly, after moving the low `FORGET_RADIX`
  bits of `h` onto a per-unit buffer (`buffer = buffer * 2**FORGET_RADIX + h mod 2**FORGET_RADIX`);
  the buffer's remainder modulo `z_n` then goes into the product's free low digits (`buffer mod z_n`,
  below `z_n`), and the buffer is divided by `z_n`. The net growth of the buffer, log2(2**10 / z_n)
  bits, is exactly the information that forgetting destroys, and `forget` / `remember` are each
  other's inverse bit for bit;
- the additive part, `round((1 - z) * g * 2**HIDDEN_RADIX)`, is undone by subtracting it again.

The buffer (`Buffer`) is one integer word per unit, kept in the carry, with a stack of the words that
filled up. This differs from the paper's `InformationBuffer` in:
  1. The stack has a fixed capacity (static shapes under `jit`), and a word is pushed per batch row
     (when any unit of that row could overflow), so a row of a batch behaves as the same example
     alone, and `jax.vmap` of an unbatched step equals the batched step.
  2. The paper marks the steps that pushed in a global bit mask; here each row counts the steps its
     current word has taken (`since`) and each pushed word keeps its count (`counts`): the reverse
     step pops where that count returns to zero.
  3. Words are int64 under `jax_enable_x64`, else int32 (JAX then has no 64-bit integers); an int32
     word holds 21 bits between pushes instead of 53, so it needs about 2.5x more words.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HIDDEN_RADIX = 23  # fractional bits of the fixed-point hidden state (as in the paper)
FORGET_RADIX = 10  # fractional bits of a quantised forget gate (as in the paper)


class Buffer(NamedTuple):
    """The bits that forgetting removed from the hidden state, per unit (see the module docstring).

    `U` is the number of fixed-point units, `K` the stack's capacity in words.

    Attributes:
      word: shape=(*batch, U), dtype=int64 (int32 without x64): the word being filled, per unit.
      since: shape=(*batch, 1), dtype=int32: steps taken since `word` was started.
      depth: shape=(*batch, 1), dtype=int32: words pushed (above `K`, words were lost: see `Buffer.lost`).
      words: shape=(*batch, K * U): the pushed words, slot `k` in `[k * U, (k + 1) * U)`; zero above `depth`.
      counts: shape=(*batch, K), dtype=int32: the `since` of each pushed word.
    """

    word: jax.Array
    since: jax.Array
    depth: jax.Array
    words: jax.Array
    counts: jax.Array

    def lost(self) -> jax.Array:
        """Per row, whether more words were pushed than the stack holds (the carry can then no longer
        be inverted exactly): shape (*batch,), bool."""
        return self.depth[..., 0] > self.counts.shape[-1]


def int_dtype() -> np.dtype:
    """The integer type of the fixed-point state and its buffer: int64 under x64, else int32."""
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.int64))


def steps_per_word(max_forget_bits: int, word_bits: int) -> int:
    """The fewest steps a word takes before it is pushed: at most `max_forget_bits` bits enter it per
    step (a word that started at 0 is below 2**(b n) after n steps), and it is pushed once it reaches
    2**(word_bits - 1 - FORGET_RADIX), the largest that the next shift by FORGET_RADIX keeps in range."""
    return (word_bits - 1 - FORGET_RADIX) // max_forget_bits + 1


def capacity(max_steps: int, max_forget_bits: int) -> int:
    """Stack slots that hold every word pushed in `max_steps` steps, whatever the gates."""
    return max(1, math.ceil(max_steps / steps_per_word(max_forget_bits, int_dtype().itemsize * 8)))


def empty_buffer(batch_shape: tuple, units: int, slots: int) -> Buffer:
    dtype, batch = int_dtype(), tuple(batch_shape)
    count = jnp.zeros(batch + (1,), jnp.int32)
    return Buffer(jnp.zeros(batch + (units,), dtype), count, count, jnp.zeros(batch + (slots * units,), dtype),
                  jnp.zeros(batch + (slots,), jnp.int32))


def _per_row(fn, *arrays):
    """`fn` mapped over the rows of the batch: the leading dims of every array, each with one trailing
    axis."""
    batch = arrays[0].shape[:-1]
    rows = math.prod(batch)
    flat = [a.reshape((rows,) + a.shape[len(batch):]) for a in arrays]
    out = jax.vmap(fn)(*flat)
    return jax.tree.map(lambda a: a.reshape(batch + a.shape[1:]), out)


def push_full(buffer: Buffer) -> Buffer:
    """Start the step: in each row where a word could overflow this step, push the row's words onto
    the stack and start new ones (at zero); then count the step."""
    units, slots = buffer.word.shape[-1], buffer.counts.shape[-1]
    limit = 2 ** (buffer.word.dtype.itemsize * 8 - 1 - FORGET_RADIX)

    def row(word, since, depth, words, counts):
        full = jnp.max(word) >= limit
        slot = jnp.minimum(depth[0], slots - 1)
        write = full & (depth[0] < slots)
        old = lax.dynamic_slice(words, (slot * units,), (units,))
        words = lax.dynamic_update_slice(words, jnp.where(write, word, old), (slot * units,))
        counts = counts.at[slot].set(jnp.where(write, since[0], counts[slot]))
        return (jnp.where(full, jnp.zeros_like(word), word), jnp.where(full, 0, since) + 1,
                depth + full.astype(depth.dtype), words, counts)

    full = jnp.max(buffer.word, axis=-1, keepdims=True) >= limit
    # Words fill in tens of steps, so most steps touch no stack: skip it then (under vmap, a select).
    return lax.cond(jnp.any(full), lambda b: Buffer(*_per_row(row, *b)), lambda b: b._replace(since=b.since + 1),
                    buffer)


def pop_started(buffer: Buffer) -> Buffer:
    """Undo `push_full`: uncount the step, and in each row whose words started at this step, pop the
    words that were pushed then (their slot is zeroed again)."""
    units = buffer.word.shape[-1]

    def row(word, since, depth, words, counts):
        since = since - 1
        started = (since[0] == 0) & (depth[0] > 0)
        slot = jnp.maximum(depth[0] - 1, 0)
        pushed = lax.dynamic_slice(words, (slot * units,), (units,))
        words = lax.dynamic_update_slice(words, jnp.where(started, jnp.zeros_like(pushed), pushed), (slot * units,))
        return (jnp.where(started, pushed, word), jnp.where(started, counts[slot], since),
                depth - started.astype(depth.dtype), words, counts.at[slot].set(jnp.where(started, 0, counts[slot])))

    started = (buffer.since == 1) & (buffer.depth > 0)
    return lax.cond(jnp.any(started), lambda b: Buffer(*_per_row(row, *b)),
                    lambda b: b._replace(since=b.since - 1), buffer)


def gate_fixed(z: jax.Array, max_forget_bits: int, dtype) -> jax.Array:
    """`round(z * 2**FORGET_RADIX)` of a gate in `[2**-max_forget_bits, 1]`, as integers of `dtype`."""
    n = jnp.round(z * 2**FORGET_RADIX).astype(dtype)
    return jnp.clip(n, 2 ** (FORGET_RADIX - max_forget_bits), 2**FORGET_RADIX)


def to_fixed(x: jax.Array, dtype) -> jax.Array:
    return jnp.round(x * 2**HIDDEN_RADIX).astype(dtype)


def to_float(n: jax.Array, dtype) -> jax.Array:
    """The value a fixed-point integer stands for (exact while it fits the float's mantissa)."""
    return n.astype(dtype) * (2.0**-HIDDEN_RADIX)


def forget(h: jax.Array, z: jax.Array, word: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`h * z / 2**FORGET_RADIX`, exactly invertible: the paper's `FixedMultiply` with its buffer.

    `h` fixed point, `z` a gate from `gate_fixed`, `word` the units' buffer words (below
    2**(bits - 1 - FORGET_RADIX), see `push_full`). Returns the product and the new words.
    """
    mask = 2**FORGET_RADIX - 1
    stacked = (word << FORGET_RADIX) | (h & mask)  # push h's low bits (h & mask is h mod 2**10 for negative h too)
    quotient = lax.div(stacked, z)  # stacked >= 0: truncation is floor; one division gives both parts
    return (h >> FORGET_RADIX) * z + (stacked - quotient * z), quotient


def remember(h: jax.Array, z: jax.Array, word: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `forget` (the paper's `FixedDivide`)."""
    quotient = lax.div(h, z)
    remainder = h - quotient * z
    below = remainder < 0  # floor division and modulo, so negative h round-trips
    quotient, remainder = jnp.where(below, quotient - 1, quotient), jnp.where(below, remainder + z, remainder)
    stacked = word * z + remainder
    return (quotient << FORGET_RADIX) | (stacked & (2**FORGET_RADIX - 1)), stacked >> FORGET_RADIX


@jax.custom_jvp
def straight_through(exact: jax.Array, surrogate: jax.Array) -> jax.Array:
    """`exact` (its value and dtype) with `surrogate`'s derivative.

    A custom rule rather than `exact + (surrogate - stop_gradient(surrogate))`: XLA may compute the
    two copies of `surrogate` in different fusions, whose results can differ in the last bit, and
    the value must be `exact` bit for bit (the inverse recomputes the gates from it)."""
    del surrogate
    return exact


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    return primals[0], tangents[1].astype(primals[0].dtype)
