"""Cells whose recurrence is linear and diagonal in the carry: LRU, minGRU, minLSTM.

Each is a `Cell` with both forms:
- `step(params, carry, x) -> (carry, y)`, the sequential cell, usable with every option of
  `jaxbptt.unroll` / `jaxbptt.value_and_grad` (truncation, clip_norm, diagnostics, remat, ...);
- `parallel(params, carry, xs, *, axis_name=None) -> (final_carry, ys)`, the whole sequence at
  once: the inputs' contributions for all steps are computed first, then
  `h_t = a_t * h_{t-1} + b_t` is one `jaxbptt.linear_scan`. It equals `lax.scan` of `step`,
  values and gradients, and is differentiated by `jax.grad` / `jax.vjp` (exact gradients only:
  truncation and per-step clipping act inside a sequential reverse loop and have no parallel form
  here). With `axis_name`, inside `jax.shard_map` with time split over that mesh axis, `xs` and
  `ys` are this device's slice and the scan is split as `linear_scan(..., axis_name=)` splits it;
  `final_carry` is the whole sequence's, on every device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .. import _validate as v
from .._cells.rnn import Cell, _check_positive_int, _dense, _lecun_normal, _zeros_carry
from .._parallel import time_sharding
from .._parallel.linear_scan import linear_scan


def _along_last(vec, like):
    """`vec` of shape (N,) reshaped to broadcast against `like` (..., N) without rank promotion."""
    return vec.reshape((1,) * (like.ndim - 1) + vec.shape)


def _parallel_form(coefficients, output=None):
    """`parallel` from `coefficients(params, xs) -> (a, b)` (each broadcastable to (T, *batch, H))
    and an optional `output(params, hs, xs) -> ys` (default: the states)."""

    def parallel(params, carry, xs, *, axis_name=None):
        length = v.time_length("xs", xs)
        if axis_name is not None:
            time_sharding.axis_size("parallel", axis_name)
        a, b = coefficients(params, xs)
        h0 = jnp.asarray(carry, b.dtype)
        hs = linear_scan(a, b, h0, axis_name=axis_name)
        if not length:
            final = h0
        elif axis_name is None:
            final = hs[-1]
        else:  # the last slice's end, where the sequence ends
            final = time_sharding.last_on_every_device(hs[-1], axis_name)
        return final, (hs if output is None else output(params, hs, xs))

    return parallel


# ----------------------------------------------------------------------------------- minGRU, minLSTM


def _gates_init(names, hidden_size):
    def init(key, input_size: int, dtype=jnp.float32):
        _check_positive_int("input_size", input_size)
        keys = jax.random.split(key, len(names))
        params = {}
        for k, name in zip(keys, names):
            params["W_" + name] = _lecun_normal(k, (input_size, hidden_size), dtype)
            params["b_" + name] = jnp.zeros((hidden_size,), dtype)
        return params

    return init


def mingru(hidden_size: int) -> Cell:
    """minGRU (Feng et al. 2024, "Were RNNs All We Needed?"), its plain (not log-space) form.

    `z_t = sigmoid(x_t @ W_z + b_z)`, `h~_t = x_t @ W_h + b_h`,
    `h_t = (1 - z_t) * h_{t-1} + z_t * h~_t`, `y_t = h_t`. The gates read only the input, so the
    recurrence is linear in `h` and `parallel` runs it as `jaxbptt.linear_scan(1 - z, z * h~, h_0)`.
    (The paper's log-space variant, which also passes `h~` through a positive function, is a
    numerically safer route to the same scan at long T in low precision; not implemented here.)

    Args:
      hidden_size: H.

    Returns:
      A `Cell` with params `{"W_z", "W_h": (D, H), "b_z", "b_h": (H,)}`, carry `(*batch, H)` and a
      `parallel(params, carry, xs, *, axis_name=None) -> (final_carry, ys)` form (time split over
      devices with `axis_name`: see the module). `step` works with every option of
      `jaxbptt.value_and_grad`; `parallel` gives exact gradients by `jax.grad`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.mingru(8)
      >>> params = cell.init(jax.random.key(0), 3)
      >>> xs = jnp.ones((20, 2, 3))
      >>> final, ys = cell.parallel(params, cell.initial_carry((2,)), xs)
      >>> final_seq, ys_seq = jax.lax.scan(lambda h, x: cell.step(params, h, x), cell.initial_carry((2,)), xs)
      >>> ys.shape, bool(jnp.allclose(ys, ys_seq, atol=1e-6))
      ((20, 2, 8), True)
    """
    _check_positive_int("hidden_size", hidden_size)

    def gates(params, x):
        z = jax.nn.sigmoid(_dense(x, params["W_z"], params["b_z"]))
        return 1 - z, z * _dense(x, params["W_h"], params["b_h"])

    def step(params, h, x):
        a, b = gates(params, x)
        h = (a * h + b).astype(h.dtype)
        return h, h

    return Cell(_gates_init(("z", "h"), hidden_size), _zeros_carry(hidden_size), step, _parallel_form(gates))


def minlstm(hidden_size: int) -> Cell:
    """minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"), its plain (not log-space) form.

    `f_t = sigmoid(x_t @ W_f + b_f)`, `i_t = sigmoid(x_t @ W_i + b_i)`, normalised to
    `f'_t = f_t / (f_t + i_t)`, `i'_t = i_t / (f_t + i_t)` (the paper's length-independent scaling),
    `h_t = f'_t * h_{t-1} + i'_t * (x_t @ W_h + b_h)`, `y_t = h_t`. `parallel` runs it as
    `jaxbptt.linear_scan(f', i' * h~, h_0)`.

    Args:
      hidden_size: H.

    Returns:
      A `Cell` with params `{"W_f", "W_i", "W_h": (D, H), "b_f", "b_i", "b_h": (H,)}`, carry
      `(*batch, H)` and a `parallel(params, carry, xs, *, axis_name=None) -> (final_carry, ys)` form
      (time split over devices with `axis_name`: see the module). `step` works with every option of
      `jaxbptt.value_and_grad`; `parallel` gives exact gradients by `jax.grad`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.minlstm(4)
      >>> params = cell.init(jax.random.key(0), 3)
      >>> final, ys = cell.parallel(params, cell.initial_carry(), jnp.ones((10, 3)))
      >>> final.shape, ys.shape
      ((4,), (10, 4))
    """
    _check_positive_int("hidden_size", hidden_size)

    def gates(params, x):
        f = jax.nn.sigmoid(_dense(x, params["W_f"], params["b_f"]))
        i = jax.nn.sigmoid(_dense(x, params["W_i"], params["b_i"]))
        return f / (f + i), i / (f + i) * _dense(x, params["W_h"], params["b_h"])

    def step(params, h, x):
        a, b = gates(params, x)
        h = (a * h + b).astype(h.dtype)
        return h, h

    return Cell(_gates_init(("f", "i", "h"), hidden_size), _zeros_carry(hidden_size), step, _parallel_form(gates))


# ----------------------------------------------------------------------------------------------- LRU


def lru(hidden_size: int, r_min: float = 0.0, r_max: float = 1.0, *, max_phase: float = 2 * math.pi) -> Cell:
    """Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
    Sequences"): a complex diagonal linear recurrence with a real output projection.

    `lambda = exp(-exp(nu_log) + i exp(theta_log))` (the exponential parameterisation keeps
    `|lambda| < 1`), `gamma = exp(gamma_log)` (the normalisation, initialised to
    `sqrt(1 - |lambda|^2)`),

        h_t = lambda * h_{t-1} + gamma * (x_t @ (B_re + i B_im))     (complex, shape (*batch, H))
        y_t = Re(h_t @ (C_re + i C_im)) + D * x_t                    (real, shape (*batch, D_in))

    as in the paper's appendix code, with matrices laid out `x @ W` (so `B` is `(D_in, H)` and `C` is
    `(H, D_in)`); the output has the input's width. Initialisation follows the paper: `|lambda|`
    uniform on the ring `[r_min, r_max]` (uniform in area), phase uniform in `[0, max_phase)`, `B` and
    `C` Glorot-like complex normals, `D` standard normal. `parallel` runs the recurrence as
    `jaxbptt.linear_scan(lambda, ..., h_0)` with `lambda` shared over time.

    Args:
      hidden_size: H, the number of complex state units.
      r_min, r_max: the ring of initial eigenvalue magnitudes, `0 <= r_min < r_max <= 1`.
      max_phase: the largest initial eigenvalue phase (radians, > 0).

    Returns:
      A `Cell` whose carry is complex (`complex64` for float32 params, `complex128` for float64),
      `initial_carry(batch_shape, dtype)` giving the complex dtype of that precision, and a
      `parallel(params, carry, xs, *, axis_name=None) -> (final_carry, ys)` form (time split over
      devices with `axis_name`: see the module). `step` works with every option of
      `jaxbptt.value_and_grad`; `parallel` gives exact gradients by `jax.grad`.

    Raises:
      ValueError: for a ring outside `0 <= r_min < r_max <= 1` or a non-positive `max_phase`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.lru(16, r_min=0.9, r_max=0.999)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> h0 = cell.initial_carry((2,))
      >>> final, ys = cell.parallel(params, h0, jnp.ones((30, 2, 4)))
      >>> bool(jnp.iscomplexobj(final)), ys.shape
      (True, (30, 2, 4))
    """
    _check_positive_int("hidden_size", hidden_size)
    if not (0.0 <= r_min < r_max <= 1.0):
        raise ValueError(f"lru needs 0 <= r_min < r_max <= 1 (the ring of |lambda| at initialisation); "
                         f"got r_min={r_min!r}, r_max={r_max!r}.")
    if not max_phase > 0:
        raise ValueError(f"lru: max_phase must be > 0 (radians); got max_phase={max_phase!r}.")
    H = hidden_size

    def init(key, input_size: int, dtype=jnp.float32):
        _check_positive_int("input_size", input_size)
        k = jax.random.split(key, 7)
        # u1 > 0 keeps nu_log finite (|lambda| = 0 exactly would make its gradient 0 * inf).
        u1 = jax.random.uniform(k[0], (H,), dtype, minval=jnp.finfo(dtype).tiny)
        u2 = jax.random.uniform(k[1], (H,), dtype)
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = jnp.log(max_phase * u2 + jnp.finfo(dtype).tiny)
        gamma_log = jnp.log(jnp.sqrt(-jnp.expm1(-2 * jnp.exp(nu_log))))
        normal = lambda key, shape, fan: jax.random.normal(key, shape, dtype) / jnp.sqrt(jnp.asarray(fan, dtype))
        return {
            "nu_log": nu_log, "theta_log": theta_log, "gamma_log": gamma_log,
            "B_re": normal(k[2], (input_size, H), 2 * input_size), "B_im": normal(k[3], (input_size, H), 2 * input_size),
            "C_re": normal(k[4], (H, input_size), H), "C_im": normal(k[5], (H, input_size), H),
            "D": jax.random.normal(k[6], (input_size,), dtype),
        }

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return jnp.zeros(tuple(batch_shape) + (H,), jnp.result_type(dtype, jnp.complex64))

    def decay(params):
        return jnp.exp(-jnp.exp(params["nu_log"]) + 1j * jnp.exp(params["theta_log"]))

    def inputs(params, x):
        gamma = jnp.exp(params["gamma_log"])
        re, im = _dense(x, params["B_re"]), _dense(x, params["B_im"])
        return (re + 1j * im) * _along_last(gamma, re)

    def output(params, h, x):
        y = _dense(h.real, params["C_re"]) - _dense(h.imag, params["C_im"])
        return y + x * _along_last(params["D"], x)

    def step(params, h, x):
        lam = decay(params)
        h = (_along_last(lam, h) * h + inputs(params, x)).astype(h.dtype)
        return h, output(params, h, x)

    def coefficients(params, xs):
        return decay(params), inputs(params, xs)

    return Cell(init, initial_carry, step, _parallel_form(coefficients, output))
