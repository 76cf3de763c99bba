"""Benchmark problems: a model step, its loss and data, at one size."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import jaxbptt as jb

OUTPUT_SIZE = 10


def mse(y, t):
    return jnp.mean((y - t) ** 2)


class Problem(NamedTuple):
    cell: str
    T: int
    B: int
    D: int
    H: int
    step: Callable
    params: Any
    carry: Any
    xs: jax.Array
    targets: jax.Array


def _two_layer(H: int) -> jb.Cell:
    """The user-defined step of the benchmarks: two stacked tanh layers, a dict carry, a readout.
    It takes jaxbptt's generic path (no hand-derived kernel)."""

    def init(key, D, dtype=jnp.float32):
        k = jax.random.split(key, 3)
        normal = lambda k_, shape: (jax.random.normal(k_, shape) / jnp.sqrt(shape[0])).astype(dtype)
        return {"W1": normal(k[0], (D + H, H)), "b1": jnp.zeros((H,), dtype),
                "W2": normal(k[1], (2 * H, H)), "b2": jnp.zeros((H,), dtype), "Wy": normal(k[2], (H, OUTPUT_SIZE))}

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return {"h1": jnp.zeros(batch_shape + (H,), dtype), "h2": jnp.zeros(batch_shape + (H,), dtype)}

    def step(p, c, x):
        h1 = jnp.tanh(jnp.concatenate([x, c["h1"]], -1) @ p["W1"] + p["b1"])
        h2 = jnp.tanh(jnp.concatenate([h1, c["h2"]], -1) @ p["W2"] + p["b2"])
        return {"h1": h1, "h2": h2}, h2 @ p["Wy"]

    return jb.Cell(init, initial_carry, step)


BUILT_IN = {"elman": jb.elman, "lstm": jb.lstm, "gru": jb.gru}


def _masked(cell: jb.Cell) -> jb.Cell:
    """`jb.masked` of a cell: its input is `(x, mask)` (variable-length sequences)."""
    return jb.Cell(cell.init, cell.initial_carry, jb.masked(cell.step))


def _stacked2(name: str, H: int) -> jb.Cell:
    """Two layers of a built-in cell, the second with the readout: `jb.stacked` of their steps."""
    first, second = BUILT_IN[name](H), jb.with_readout(BUILT_IN[name](H), OUTPUT_SIZE)

    def init(key, D, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        return first.init(k1, D, dtype), second.init(k2, H, dtype)

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return first.initial_carry(batch_shape, dtype), second.initial_carry(batch_shape, dtype)

    return jb.Cell(init, initial_carry, jb.stacked(first.step, second.step))


MODELS = {
    "elman": lambda H: jb.with_readout(jb.elman(H), OUTPUT_SIZE),
    "lstm": lambda H: jb.with_readout(jb.lstm(H), OUTPUT_SIZE),
    "gru": lambda H: jb.with_readout(jb.gru(H), OUTPUT_SIZE),
    "custom": _two_layer,
    **{f"masked-{name}": (lambda H, name=name: _masked(jb.with_readout(BUILT_IN[name](H), OUTPUT_SIZE)))
       for name in BUILT_IN},
    **{f"stacked2-{name}": (lambda H, name=name: _stacked2(name, H)) for name in BUILT_IN},
}


# Reversible cells: their carry's buffer is sized for the sequence (it holds T steps of forgotten bits).
SIZED_MODELS = {
    "revgru": lambda H, T: jb.with_readout(jb.revgru(H, max_steps=T), OUTPUT_SIZE),
    "revlstm": lambda H, T: jb.with_readout(jb.revlstm(H, max_steps=T), OUTPUT_SIZE),
}


def make_problem(cell: str, T: int, B: int, D: int, H: int, dtype=jnp.float32, seed: int = 0) -> Problem:
    model = SIZED_MODELS[cell](H, T) if cell in SIZED_MODELS else MODELS[cell](H)
    kp, kx, kt = jax.random.split(jax.random.key(seed), 3)
    params = model.init(kp, D, dtype)
    xs = jax.random.normal(kx, (T, B, D), dtype)
    if cell.startswith("masked-"):  # lengths spread from T down to T / 2
        xs = (xs, jb.lengths_to_mask(T - (jnp.arange(B) * T) // (2 * B), T))
    targets = jax.random.normal(kt, (T, B, OUTPUT_SIZE), dtype)
    return Problem(cell, T, B, D, H, model.step, params, model.initial_carry((B,), dtype), xs, targets)


def as_float64(problem: Problem) -> Problem:
    cast = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    return problem._replace(params=cast(problem.params), carry=cast(problem.carry), xs=cast(problem.xs),
                            targets=cast(problem.targets))
