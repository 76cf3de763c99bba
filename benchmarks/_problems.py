"""Benchmark problems: a model step, its loss and data, at one size."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.extend.core
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
    xs: Any
    targets: Any
    loss: Callable = mse


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


def _leaky(H: int) -> jb.Cell:
    """A leaky-integrator RNN written by hand: h' = 0.9 h + 0.1 tanh(x W + h U + b), a readout."""

    def init(key, D, dtype=jnp.float32):
        k = jax.random.split(key, 3)
        normal = lambda k_, shape: (jax.random.normal(k_, shape) / jnp.sqrt(shape[0])).astype(dtype)
        return {"W": normal(k[0], (D, H)), "U": normal(k[1], (H, H)), "b": jnp.zeros((H,), dtype),
                "V": normal(k[2], (H, OUTPUT_SIZE))}

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return jnp.zeros(batch_shape + (H,), dtype)

    def step(p, h, x):
        h = 0.9 * h + 0.1 * jnp.tanh(x @ p["W"] + h @ p["U"] + p["b"])
        return h, h @ p["V"]

    return jb.Cell(init, initial_carry, step)


def _layer_norm(z, gain, bias):
    mean = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean((z - mean) ** 2, axis=-1, keepdims=True)
    return (z - mean) * jax.lax.rsqrt(var + 1e-5) * gain + bias


def _ln_gru(H: int) -> jb.Cell:
    """A GRU with layer-normalised gate pre-activations (Ba et al. 2016), written by hand, a readout."""

    def init(key, D, dtype=jnp.float32):
        k = jax.random.split(key, 3)
        normal = lambda k_, shape: (jax.random.normal(k_, shape) / jnp.sqrt(shape[0])).astype(dtype)
        return {"Wx": normal(k[0], (D, 3 * H)), "Wh": normal(k[1], (H, 3 * H)),
                "gain": jnp.ones((3 * H,), dtype), "bias": jnp.zeros((3 * H,), dtype),
                "V": normal(k[2], (H, OUTPUT_SIZE))}

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return jnp.zeros(batch_shape + (H,), dtype)

    def step(p, h, x):
        gx = _layer_norm(x @ p["Wx"], p["gain"], p["bias"])
        gh = h @ p["Wh"]
        z = jax.nn.sigmoid(gx[..., :H] + gh[..., :H])
        r = jax.nn.sigmoid(gx[..., H:2 * H] + gh[..., H:2 * H])
        n = jnp.tanh(gx[..., 2 * H:] + r * gh[..., 2 * H:])
        h = (1 - z) * n + z * h
        return h, h @ p["V"]

    return jb.Cell(init, initial_carry, step)


def _mlp_loss(w, x, t):
    hidden = jnp.tanh(x @ w["W1"] + w["b1"])
    return jnp.mean((hidden @ w["W2"] + w["b2"] - t) ** 2)


def _hypergradient(H: int) -> jb.Cell:
    """One SGD step of a one-hidden-layer MLP (H units, weight decay) per time step: the carry is the
    MLP's weights, the input a batch `(x, t)`, the parameters the log learning rate and log weight
    decay, the output the batch's training loss. Differentiating the summed loss with respect to
    the parameters is hypergradient descent through an unrolled training run (an inner jax.grad)."""

    def init(key, D, dtype=jnp.float32):
        del key, D
        return {"log_lr": jnp.asarray(jnp.log(0.05), dtype), "log_wd": jnp.asarray(jnp.log(1e-3), dtype)}

    def initial_carry(batch_shape=(), dtype=jnp.float32, D=8, key=jax.random.key(1)):
        k1, k2 = jax.random.split(key)
        return {"W1": (jax.random.normal(k1, (D, H)) / jnp.sqrt(D)).astype(dtype), "b1": jnp.zeros((H,), dtype),
                "W2": (jax.random.normal(k2, (H, 1)) / jnp.sqrt(H)).astype(dtype), "b2": jnp.zeros((1,), dtype)}

    def step(hp, w, batch):
        loss, g = jax.value_and_grad(_mlp_loss)(w, *batch)
        lr, wd = jnp.exp(hp["log_lr"]), jnp.exp(hp["log_wd"])
        w = jax.tree.map(lambda a, da: a - lr * (da + wd * a), w, g)
        return w, loss

    return jb.Cell(init, initial_carry, step)


def training_loss(y, t):
    """The hypergradient problem's per-step loss: the inner training loss itself."""
    del t
    return y


USER_STEPS = ("custom", "leaky", "lngru", "hypergrad")


MODELS = {
    "elman": lambda H: jb.with_readout(jb.elman(H), OUTPUT_SIZE),
    "lstm": lambda H: jb.with_readout(jb.lstm(H), OUTPUT_SIZE),
    "gru": lambda H: jb.with_readout(jb.gru(H), OUTPUT_SIZE),
    "custom": _two_layer,
    "leaky": _leaky,
    "lngru": _ln_gru,
    "hypergrad": _hypergradient,
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
    if cell == "hypergrad":  # a batch of regression data per step; the carry is the MLP
        teacher = jnp.sin(jnp.arange(1, D + 1, dtype=dtype))
        xs = (xs, (jnp.tanh(xs @ teacher) + 0.1 * jax.random.normal(kt, (T, B), dtype))[..., None])
        return Problem(cell, T, B, D, H, model.step, params, model.initial_carry((), dtype, D=D), xs,
                       jnp.zeros((T,), dtype), training_loss)
    if cell.startswith("masked-"):  # lengths spread from T down to T / 2
        xs = (xs, jb.lengths_to_mask(T - (jnp.arange(B) * T) // (2 * B), T))
    targets = jax.random.normal(kt, (T, B, OUTPUT_SIZE), dtype)
    return Problem(cell, T, B, D, H, model.step, params, model.initial_carry((B,), dtype), xs, targets)


def as_float64(problem: Problem) -> Problem:
    cast = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    return problem._replace(params=cast(problem.params), carry=cast(problem.carry), xs=cast(problem.xs),
                            targets=cast(problem.targets))


def _dot_flop(jaxpr: jax.extend.core.Jaxpr) -> int:
    """FLOP of the matrix products in a jaxpr and the jaxprs nested in it (2 per multiply-add)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            depth = math.prod(eqn.invars[0].aval.shape[d] for d in contracted)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * depth
        total += sum(_dot_flop(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return total


def step_flop(problem: Problem) -> int:
    """Matrix-product FLOP of one step of the problem's model over its batch, counted in the step's own
    jaxpr: so a mask adds nothing, a second layer adds its products, a readout its own."""
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), problem.xs)
    return _dot_flop(jax.make_jaxpr(problem.step)(problem.params, problem.carry, x).jaxpr)
