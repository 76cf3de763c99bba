"""Shared test material: user-defined steps of several pytree shapes, losses, data and the
independent references (a Python loop and jax.grad through lax.scan)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import jaxbptt as jb


def mse(y, t):
    return jnp.mean((y - t) ** 2)


# ---- user-defined steps --------------------------------------------------------------------------


def two_layer_init(key, d, h, o=3):
    k = jax.random.split(key, 3)
    return {
        "W1": jax.random.normal(k[0], (d + h, h)) / jnp.sqrt(d + h),
        "b1": jnp.zeros(h),
        "W2": jax.random.normal(k[1], (2 * h, h)) / jnp.sqrt(2 * h),
        "b2": 0.1 * jnp.ones(h),
        "Wy": jax.random.normal(k[2], (h, o)) / jnp.sqrt(h),
    }


def _bias(b, like):
    return b.reshape((1,) * (like.ndim - 1) + b.shape)


def two_layer_step(p, c, x):
    """Dict carry, two stacked tanh layers, linear output."""
    z1 = jnp.concatenate([x, c["h1"]], -1) @ p["W1"]
    h1 = jnp.tanh(z1 + _bias(p["b1"], z1))
    z2 = jnp.concatenate([h1, c["h2"]], -1) @ p["W2"]
    h2 = jnp.tanh(z2 + _bias(p["b2"], z2))
    return {"h1": h1, "h2": h2}, h2 @ p["Wy"]


def tuple_init(key, d, h):
    k = jax.random.split(key, 3)
    return (jax.random.normal(k[0], (d, h)) / jnp.sqrt(d), jax.random.normal(k[1], (h, h)) / jnp.sqrt(h),
            jax.random.normal(k[2], (h, 2)) / jnp.sqrt(h))


def tuple_step(p, c, x):
    """Tuple params, tuple carry (state, running mean), tuple output (vector, scalar per row)."""
    w, u, v = p
    h, m = c
    h = jnp.tanh(x @ w + h @ u)
    m = 0.9 * m + 0.1 * h
    return (h, m), (h @ v, jnp.sum(m * m, axis=-1))


def tuple_loss(y, t):
    return jnp.mean((y[0] - t[0]) ** 2) + jnp.mean((y[1] - t[1]) ** 2)


def dict_input_init(key, d, h):
    return {"alpha": jnp.asarray(0.7), "beta": jnp.asarray(-0.3), "W": jax.random.normal(key, (d, h)) / jnp.sqrt(d)}


def dict_input_step(p, h, x):
    """Scalar params, dict inputs {'a': (..., D), 'b': (...,)}."""
    h = jnp.tanh(p["alpha"] * h + x["a"] @ p["W"] + p["beta"] * x["b"][..., None])
    return h, h


def sum_of_squares(y, t):
    return jnp.sum((y - t) ** 2)


# ---- problems: (step, loss, params, carry, xs, targets) ----------------------------------------------


def problem(name: str, T: int, B: int = 3, D: int = 4, H: int = 5, seed: int = 0, dtype=jnp.float64):
    """A named test problem with random data, batch B (B=0: no batch axis)."""
    key, kx, kt, kc = jax.random.split(jax.random.key(seed), 4)
    batch = (B,) if B else ()
    xs = jax.random.normal(kx, (T,) + batch + (D,), dtype)
    if name in ("elman", "relu", "lstm", "gru"):
        cell = {
            "elman": jb.elman(H),
            "relu": jb.elman(H, activation="relu", recurrent_init="identity"),
            "lstm": jb.lstm(H),
            "gru": jb.gru(H),
        }[name]
        model = jb.with_readout(cell, 3)
        params = model.init(key, D, dtype)
        params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(kc, a.shape, dtype), params)
        targets = jax.random.normal(kt, (T,) + batch + (3,), dtype)
        carry = jax.tree.map(lambda a: a + 0.1, model.initial_carry(batch, dtype))
        return model.step, mse, params, carry, xs, targets
    if name == "bare_gru":
        cell = jb.gru(H)
        params = cell.init(key, D, dtype)
        targets = jax.random.normal(kt, (T,) + batch + (H,), dtype)
        return cell.step, mse, params, cell.initial_carry(batch, dtype), xs, targets
    if name == "two_layer":
        params = jax.tree.map(lambda a: a.astype(dtype), two_layer_init(key, D, H))
        carry = {"h1": jnp.full(batch + (H,), 0.1, dtype), "h2": jnp.zeros(batch + (H,), dtype)}
        targets = jax.random.normal(kt, (T,) + batch + (3,), dtype)
        return two_layer_step, mse, params, carry, xs, targets
    if name == "tuple":
        params = jax.tree.map(lambda a: a.astype(dtype), tuple_init(key, D, H))
        carry = (jnp.full(batch + (H,), 0.2, dtype), jnp.zeros(batch + (H,), dtype))
        targets = (jax.random.normal(kt, (T,) + batch + (2,), dtype), jax.random.normal(kc, (T,) + batch, dtype))
        return tuple_step, tuple_loss, params, carry, xs, targets
    if name == "dict_input":
        params = jax.tree.map(lambda a: a.astype(dtype), dict_input_init(key, D, H))
        xs = {"a": xs, "b": jax.random.normal(kc, (T,) + batch, dtype)}
        targets = jax.random.normal(kt, (T,) + batch + (H,), dtype)
        return dict_input_step, sum_of_squares, params, jnp.zeros(batch + (H,), dtype), xs, targets
    raise ValueError(name)


CELLS = ("elman", "relu", "lstm", "gru")
USER_STEPS = ("two_layer", "tuple", "dict_input")


# ---- independent references ---------------------------------------------------------------------------


def scan_loss(step, loss_fn):
    """Plain `jax.grad` target: the summed per-step loss through `lax.scan`."""

    def loss(params, carry, xs, targets):
        def body(c, inputs):
            x, t = inputs
            c, y = step(params, c, x)
            return c, loss_fn(y, t)

        final, losses = lax.scan(body, carry, (xs, targets))
        return jnp.sum(losses), final

    return loss


def loop_loss(step, loss_fn):
    """The same loss as an explicit Python loop (traces every step: keep T short)."""

    def loss(params, carry, xs, targets):
        T = jax.tree.leaves(xs)[0].shape[0]
        total = 0.0
        for t in range(T):
            carry, y = step(params, carry, jax.tree.map(lambda a: a[t], xs))
            total = total + loss_fn(y, jax.tree.map(lambda a: a[t], targets))
        return total, carry

    return loss
