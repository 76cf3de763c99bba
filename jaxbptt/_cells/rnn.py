"""Built-in cells: Elman (tanh / ReLU, IRNN), LSTM, GRU, and a linear readout.

A `Cell` is a NamedTuple of pure functions, like `optax.GradientTransformation`:

    params = cell.init(key, input_size)          # a dict of arrays
    carry = cell.initial_carry(batch_shape)      # zeros; leaves shaped (*batch_shape, H)
    carry, y = cell.step(params, carry, x)       # x shaped (*batch_shape, input_size)

Each built-in `step` is a `jaxbptt.Step`: a plain step function that also carries a hand-derived
kernel for the reverse-scan engine. Its reverse loop touches only the carry adjoint, and its
parameter gradients are matrix products over all steps of a block at once:
- the input projection `x @ W_x + b` of a whole block is one matrix product, before the loop;
- each step keeps only what its backward formula reads beyond h_t (Elman: nothing; LSTM: the gate
  activations and c_{t-1}; GRU: the gates and the recurrent candidate term);
- `dW_h = sum_t h_{t-1}^T dz_t` and `dW_x = sum_t x_t^T dz_t` are one product each per block.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._engine.kernel import Kernel, Step, closed, identity_post, kernel_for, reparametrized
from .._types import PyTree

_lecun_normal = jax.nn.initializers.lecun_normal()
_orthogonal_init = jax.nn.initializers.orthogonal()


def _orthogonal(key, shape, dtype):
    """Orthogonal initialisation computed in at least float32 (LAPACK has no 16-bit QR), then cast."""
    return _orthogonal_init(key, shape, jnp.promote_types(dtype, jnp.float32)).astype(dtype)


class Cell(NamedTuple):
    """A recurrent cell as three pure functions.

    Attributes:
      init: `init(key, input_size, dtype=jnp.float32) -> params`.
      initial_carry: `initial_carry(batch_shape=(), dtype=jnp.float32) -> carry` (zeros).
      step: `step(params, carry, x) -> (carry, y)`; `x` has shape `(*batch_shape, input_size)`.
      parallel: `parallel(params, carry, xs) -> (final_carry, ys)`, equal to `lax.scan` of `step`
        (values and gradients) but computed in O(log T) depth; None for cells without one.
    """

    init: Callable[..., PyTree]
    initial_carry: Callable[..., PyTree]
    step: Callable
    parallel: Optional[Callable] = None


class LSTMState(NamedTuple):
    """The LSTM carry.

    Attributes:
      h: shape=(*batch_shape, H), the hidden state (also the cell's output y).
      c: shape=(*batch_shape, H), the memory cell.
    """

    h: jax.Array
    c: jax.Array


def _matmul(a, b, contract):
    """A 2-D matrix product accumulated and returned in at least float32 (bfloat16 / float16
    operands of mixed precision give float32 results)."""
    out = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=out)


def _dense(x, w, b=None):
    """`x @ w (+ b)` over any leading dims, as one 2-D matrix product."""
    y = _matmul(x.reshape(-1, x.shape[-1]), w, ((1,), (0,)))
    if b is not None:
        y = y + b[None]
    return y.reshape(x.shape[:-1] + (w.shape[-1],))


def _dense_t(x, w):
    """`x @ w.T` over any leading dims (the input cotangent of `_dense`)."""
    y = _matmul(x.reshape(-1, x.shape[-1]), w, ((1,), (1,)))
    return y.reshape(x.shape[:-1] + (w.shape[0],))


def _outer_sum(a, b):
    """`sum over all leading dims of a^T b`: one matrix product over time and batch."""
    return _matmul(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), ((0,), (0,)))


def _leading_sum(a):
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _check_params(cell: str, params, keys: tuple) -> None:
    if not isinstance(params, dict) or set(params) != set(keys):
        got = f"keys {sorted(params)}" if isinstance(params, dict) else f"{type(params).__name__}"
        raise TypeError(f"params must be the {cell} cell's params from its init, a dict with keys {sorted(keys)}; "
                        f"got {got}. Were they made by another cell?")


def _check_step_args(cell: str, params, carry, x, hidden_size: int, keys: tuple, state_type=None) -> None:
    """Trace-time checks of a built-in cell's step arguments: each error names the argument, what it
    got and what was expected (instead of a shape error from deep inside the cell)."""
    _check_params(cell, params, keys)
    expected = state_type.__name__ if state_type is not None else "an array"
    if (state_type is not None and not isinstance(carry, state_type)) or (state_type is None and not hasattr(carry, "shape")):
        raise TypeError(f"carry of the {cell} cell must be {expected} (see its initial_carry); got {type(carry).__name__}.")
    for a in jax.tree.leaves(carry):
        if np.shape(a)[-1:] != (hidden_size,):
            raise ValueError(f"carry of the {cell} cell must have hidden_size={hidden_size} features on its last "
                             f"axis; got shape {np.shape(a)}.")
    width = np.shape(params[keys[0]])[0]
    if np.shape(x)[-1:] != (width,):
        raise ValueError(f"x must have input_size={width} features on its last axis (the params' input size); got "
                         f"x of shape {np.shape(x)}.")
    batch, x_batch = np.shape(jax.tree.leaves(carry)[0])[:-1], np.shape(x)[:-1]
    try:
        fits = np.broadcast_shapes(x_batch, batch) == batch
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"x has batch shape {x_batch} but the carry has batch shape {batch}; x must match (or "
                         "broadcast to) the carry's batch shape. Inputs are time-major (T, batch, features): if xs "
                         "is batch-major, pass jnp.swapaxes(xs, 0, 1).")


def _zeros_carry(hidden_size: int):
    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return jnp.zeros(tuple(batch_shape) + (hidden_size,), dtype)

    return initial_carry


def _no_consts(params, carry, u):
    del params, carry, u
    return ()


def _carry_is_output(carry):
    return carry


def _fixed(kernel: Kernel) -> Callable[..., Kernel]:
    return lambda params, carry, u: kernel


# --------------------------------------------------------------------------------------------- Elman

_ACTIVATIONS = {
    # activation, and its derivative written in terms of the activation's output
    "tanh": (jnp.tanh, lambda h: 1 - h * h),
    "relu": (jax.nn.relu, lambda h: (h > 0).astype(h.dtype)),
}
_RECURRENT_INITS = ("orthogonal", "normal", "identity")


def elman(
    hidden_size: int,
    *,
    activation: str = "tanh",
    recurrent_init: str = "orthogonal",
    recurrent_scale: float = 1.0,
) -> Cell:
    """Elman (simple) RNN: `h_t = act(x_t @ W_xh + h_{t-1} @ W_hh + b_h)`, `y_t = h_t`.

    Args:
      hidden_size: H.
      activation: `"tanh"` or `"relu"`.
      recurrent_init: initialisation of `W_hh`, times `recurrent_scale`: `"orthogonal"`,
        `"normal"` (entries N(0, 1/H), spectral radius about 1) or `"identity"`. ReLU with identity
        is the IRNN of Le, Jaitly & Hinton (2015); it also draws `W_xh` with standard deviation 1e-3, as they do.
      recurrent_scale: multiplies the recurrent initialisation (e.g. 3.0 for exploding gradients).

    Returns:
      A `Cell` with params `{"W_xh": (D, H), "W_hh": (H, H), "b_h": (H,)}` and carry `(*batch, H)`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.elman(8, activation="relu", recurrent_init="identity")
      >>> params = cell.init(jax.random.key(0), 3)
      >>> h, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
      >>> h.shape, bool(jnp.all(y == h))
      ((2, 8), True)
    """
    _check_positive_int("hidden_size", hidden_size)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}.")
    if recurrent_init not in _RECURRENT_INITS:
        raise ValueError(f"recurrent_init must be one of {list(_RECURRENT_INITS)}; got {recurrent_init!r}.")
    act, act_grad = _ACTIVATIONS[activation]

    def init(key, input_size: int, dtype=jnp.float32):
        _check_positive_int("input_size", input_size)
        kx, kh = jax.random.split(key)
        if recurrent_init == "identity":
            w_hh = jnp.eye(hidden_size, dtype=dtype)
            w_xh = 1e-3 * jax.random.normal(kx, (input_size, hidden_size), dtype)
        else:
            if recurrent_init == "orthogonal":
                w_hh = _orthogonal(kh, (hidden_size, hidden_size), dtype)
            else:
                w_hh = jax.random.normal(kh, (hidden_size, hidden_size), dtype) / jnp.sqrt(hidden_size)
            w_xh = _lecun_normal(kx, (input_size, hidden_size), dtype)
        return {"W_xh": w_xh, "W_hh": recurrent_scale * w_hh, "b_h": jnp.zeros((hidden_size,), dtype)}

    def step(params, h, x):
        _check_step_args("elman", params, h, x, hidden_size, ("W_xh", "W_hh", "b_h"))
        h = act(_dense(x, params["W_xh"], params["b_h"]) + _dense(h, params["W_hh"])).astype(h.dtype)
        return h, h

    def project(params, xs):
        return _dense(xs, params["W_xh"], params["b_h"])

    def forward(params, consts, h, u):
        h = act(u + _dense(h, params["W_hh"])).astype(h.dtype)
        return h, h, ()

    def backward(params, consts, h, h_prev, res, ct_h, ct_out):
        dz = (ct_h + ct_out) * act_grad(h)
        return _dense_t(dz, params["W_hh"]), dz

    def grads(params, consts, carry_start, us, outs, h_prevs, res, dz):
        dparams = {
            "W_xh": jnp.zeros_like(params["W_xh"]),
            "W_hh": _outer_sum(h_prevs, dz),
            "b_h": jnp.zeros_like(params["b_h"]),
        }
        return dparams, dz

    kernel = Kernel(_no_consts, project, forward, backward, grads, identity_post, _carry_is_output)
    return Cell(init, _zeros_carry(hidden_size), Step(step, _fixed(kernel), same_batch=True))


# ---------------------------------------------------------------------------------------------- LSTM


def _gate_constants(kinds: str, z):
    """Per-column (scale, shift) so that `a = scale * tanh(scale * z) + shift` applies, block by
    block of H columns, a sigmoid ("s": 0.5 tanh(z / 2) + 0.5) or a tanh ("t")."""
    width = z.shape[-1] // len(kinds)
    lead = (1,) * (z.ndim - 1)
    scale = jnp.repeat(jnp.asarray([0.5 if k == "s" else 1.0 for k in kinds], z.dtype), width).reshape(lead + (-1,))
    shift = jnp.repeat(jnp.asarray([0.5 if k == "s" else 0.0 for k in kinds], z.dtype), width).reshape(lead + (-1,))
    return scale, shift


def _activate(kinds: str, z):
    """Sigmoid and tanh gates in one elementwise pass over all gates: on CPU, XLA otherwise
    recomputes per-gate transcendentals in every fusion that reads them (measured 1.7x slower)."""
    scale, shift = _gate_constants(kinds, z)
    return scale * jnp.tanh(scale * z) + shift


def _activation_slope(kinds: str, a):
    """d a / d z from the activations: a (1 - a) for a sigmoid, 1 - a^2 for a tanh."""
    scale, shift = _gate_constants(kinds, a)
    return scale * scale - jnp.square(a - shift)


def lstm(hidden_size: int, *, forget_bias: float = 1.0) -> Cell:
    """LSTM (Hochreiter & Schmidhuber 1997, with forget gate), `y_t = h_t`.

    `z = x @ W_x + h @ W_h + b` is split into gates `[i, f, g, o]` along its last axis;
    `c' = sigmoid(f) * c + sigmoid(i) * tanh(g)`, `h' = sigmoid(o) * tanh(c')`.

    Args:
      hidden_size: H.
      forget_bias: initial value of the forget-gate bias (1.0, Jozefowicz et al. 2015).

    Returns:
      A `Cell` with params `{"W_x": (D, 4H), "W_h": (H, 4H), "b": (4H,)}` and carry
      `LSTMState(h, c)`, each `(*batch, H)`.

    Raises:
      ValueError: `hidden_size` is not a positive int.
      TypeError: `forget_bias` is not a real number.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.lstm(4)
      >>> params = cell.init(jax.random.key(0), 3)
      >>> state, y = cell.step(params, cell.initial_carry(), jnp.ones(3))
      >>> state.c.shape, y.shape
      ((4,), (4,))
    """
    _check_positive_int("hidden_size", hidden_size)
    real = isinstance(forget_bias, (int, float)) or (hasattr(forget_bias, "dtype") and np.ndim(forget_bias) == 0)
    if isinstance(forget_bias, bool) or not real or jnp.issubdtype(jnp.result_type(forget_bias), jnp.complexfloating):
        raise TypeError(f"forget_bias must be a real number (the forget gate's initial bias); got "
                        f"forget_bias={forget_bias!r} of type {type(forget_bias).__name__}.")
    H = hidden_size

    def init(key, input_size: int, dtype=jnp.float32):
        _check_positive_int("input_size", input_size)
        kx, kh = jax.random.split(key)
        w_h = jnp.concatenate([_orthogonal(k, (H, H), dtype) for k in jax.random.split(kh, 4)], axis=1)
        b = jnp.zeros((4 * H,), dtype).at[H : 2 * H].set(forget_bias)
        return {"W_x": _lecun_normal(kx, (input_size, 4 * H), dtype), "W_h": w_h, "b": b}

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        zeros = jnp.zeros(tuple(batch_shape) + (H,), dtype)
        return LSTMState(zeros, zeros)

    def step(params, state, x):
        _check_step_args("lstm", params, state, x, H, ("W_x", "W_h", "b"), LSTMState)
        z = _dense(x, params["W_x"], params["b"]) + _dense(state.h, params["W_h"])
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * state.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        h, c = h.astype(state.h.dtype), c.astype(state.c.dtype)
        return LSTMState(h, c), h

    def cell_update(z, c):
        gates = _activate("ssts", z)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = f * c + i * g
        return o * jnp.tanh(c), c, gates

    def project(params, xs):
        return _dense(xs, params["W_x"], params["b"])

    def forward(params, consts, state, u):
        h, c, gates = cell_update(u + _dense(state.h, params["W_h"]), state.c)
        h, c = h.astype(state.h.dtype), c.astype(state.c.dtype)
        return LSTMState(h, c), h, (gates, state.c)

    def backward(params, consts, h, h_prev, res, ct, ct_out):
        gates, c_prev = res
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        tc = jnp.tanh(f * c_prev + i * g)
        dh = ct.h + ct_out
        dc = ct.c + dh * o * (1 - tc * tc)
        dgates = jnp.concatenate([dc * g, dc * c_prev, dc * i, dh * tc], axis=-1)
        dz = dgates * _activation_slope("ssts", gates)
        return LSTMState(_dense_t(dz, params["W_h"]), dc * f), dz

    def grads(params, consts, carry_start, us, outs, h_prevs, res, dz):
        dparams = {
            "W_x": jnp.zeros_like(params["W_x"]),
            "W_h": _outer_sum(h_prevs, dz),
            "b": jnp.zeros_like(params["b"]),
        }
        return dparams, dz

    kernel = Kernel(_no_consts, project, forward, backward, grads, identity_post, lambda state: state.h)
    return Cell(init, initial_carry, Step(step, _fixed(kernel), same_batch=True))


# ----------------------------------------------------------------------------------------------- GRU


def gru(hidden_size: int) -> Cell:
    """GRU (Cho et al. 2014) in the cuDNN / PyTorch form, `y_t = h_t`.

    With `gx = x @ W_x + b_x` and `gh = h @ W_h + b_h`, each split into `[r, z, n]`:
    `r = sigmoid(gx_r + gh_r)`, `z = sigmoid(gx_z + gh_z)`, `n = tanh(gx_n + r * gh_n)`,
    `h' = (1 - z) * n + z * h`.

    Args:
      hidden_size: H.

    Returns:
      A `Cell` with params `{"W_x": (D, 3H), "b_x": (3H,), "W_h": (H, 3H), "b_h": (3H,)}` and carry
      `(*batch, H)`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.gru(5)
      >>> params = cell.init(jax.random.key(0), 2)
      >>> h, y = cell.step(params, cell.initial_carry((3,)), jnp.ones((3, 2)))
      >>> h.shape
      (3, 5)
    """
    _check_positive_int("hidden_size", hidden_size)
    H = hidden_size

    def init(key, input_size: int, dtype=jnp.float32):
        _check_positive_int("input_size", input_size)
        kx, kh = jax.random.split(key)
        w_h = jnp.concatenate([_orthogonal(k, (H, H), dtype) for k in jax.random.split(kh, 3)], axis=1)
        zeros = jnp.zeros((3 * H,), dtype)
        return {"W_x": _lecun_normal(kx, (input_size, 3 * H), dtype), "b_x": zeros, "W_h": w_h, "b_h": zeros}

    def step(params, h, x):
        _check_step_args("gru", params, h, x, H, ("W_x", "b_x", "W_h", "b_h"))
        rx, zx, nx = jnp.split(_dense(x, params["W_x"], params["b_x"]), 3, axis=-1)
        rh, zh, nh = jnp.split(_dense(h, params["W_h"], params["b_h"]), 3, axis=-1)
        r, z = jax.nn.sigmoid(rx + rh), jax.nn.sigmoid(zx + zh)
        h = ((1 - z) * jnp.tanh(nx + r * nh) + z * h).astype(h.dtype)
        return h, h

    def update(gx, gh, h):
        """The new state, and what the backward formula reads: `[r, z, n, gh_n]` (4H)."""
        rz = _activate("ss", gx[..., : 2 * H] + gh[..., : 2 * H])
        r, z = jnp.split(rz, 2, axis=-1)
        nh = gh[..., 2 * H :]
        n = jnp.tanh(gx[..., 2 * H :] + r * nh)
        return (1 - z) * n + z * h, jnp.concatenate([rz, n, nh], axis=-1)

    def project(params, xs):
        return _dense(xs, params["W_x"], params["b_x"])

    def forward(params, consts, h, u):
        new_h, res = update(u, _dense(h, params["W_h"], params["b_h"]), h)
        new_h = new_h.astype(h.dtype)
        return new_h, new_h, res

    def backward(params, consts, out, h_prev, res, ct, ct_out):
        rz, n, nh = res[..., : 2 * H], res[..., 2 * H : 3 * H], res[..., 3 * H :]
        r, z = jnp.split(rz, 2, axis=-1)
        dh = ct + ct_out
        dn = dh * (1 - z) * (1 - n * n)  # the cotangent of n's pre-activation
        drz = jnp.concatenate([dn * nh, dh * (h_prev - n)], axis=-1) * _activation_slope("ss", rz)
        dgh = jnp.concatenate([drz, dn * r], axis=-1)
        dgx = jnp.concatenate([drz, dn], axis=-1)
        return dh * z + _dense_t(dgh, params["W_h"]), (dgx, dgh)

    def grads(params, consts, carry_start, us, outs, h_prevs, res, locals_):
        dgx, dgh = locals_
        dparams = {
            "W_x": jnp.zeros_like(params["W_x"]),
            "b_x": jnp.zeros_like(params["b_x"]),
            "W_h": _outer_sum(h_prevs, dgh),
            "b_h": _leading_sum(dgh),
        }
        return dparams, dgx

    kernel = Kernel(_no_consts, project, forward, backward, grads, identity_post, _carry_is_output)
    return Cell(init, _zeros_carry(H), Step(step, _fixed(kernel), same_batch=True))


# ------------------------------------------------------------------------------------------- readout


def _readout_kernel(inner: Kernel) -> Kernel:
    """`inner`'s kernel under params `{"cell": ..., "W_hy", "b_y"}`, the readout applied per block."""

    def prepare(params, carry, u):
        return inner.prepare(params["cell"], carry, u)

    def project(params, xs):
        return inner.project(params["cell"], xs)

    def forward(params, consts, carry, u):
        return inner.forward(params["cell"], consts, carry, u)

    def backward(params, consts, out, prev_out, res, ct_carry, ct_out):
        return inner.backward(params["cell"], consts, out, prev_out, res, ct_carry, ct_out)

    def grads(params, consts, carry_start, us, outs, prev_outs, res, locals_):
        dcell, dus = inner.grads(params["cell"], consts, carry_start, us, outs, prev_outs, res, locals_)
        zeros = {k: jnp.zeros_like(v) for k, v in params.items() if k != "cell"}
        return {"cell": dcell, **zeros}, dus

    def post(params, outs):
        return _dense(inner.post(params["cell"], outs), params["W_hy"], params["b_y"])

    inverse = None if inner.inverse is None else (
        lambda params, consts, carry, u: inner.inverse(params["cell"], consts, carry, u))
    return Kernel(prepare, project, forward, backward, grads, post, inner.previous_out, inverse)


def with_readout(cell: Cell, output_size: int) -> Cell:
    """Add a linear readout to a cell: `y_t = h_t @ W_hy + b_y`, `h_t` being the cell's output.

    The readout runs once per block of steps, outside the sequential loops, for any inner cell
    (built-in or not).

    Args:
      cell: the inner `Cell`.
      output_size: O.

    Returns:
      A `Cell` with params `{"cell": inner params, "W_hy": (H, O), "b_y": (O,)}` and the inner carry.

    Raises:
      TypeError: `cell` is not a `Cell`; and, from its step, params that are not a dict with keys
        `"cell"`, `"W_hy"`, `"b_y"` (as its init makes).
      ValueError: `output_size` is not a positive int.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.gru(8), 2)
      >>> params = model.init(jax.random.key(0), 3)
      >>> carry, y = model.step(params, model.initial_carry((4,)), jnp.ones((4, 3)))
      >>> y.shape
      (4, 2)
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"with_readout needs a Cell as cell (jaxbptt.lstm(8), or jaxbptt.Cell(init, initial_carry, "
                        f"step) around a step function); got {cell!r} of type {type(cell).__name__}.")
    _check_positive_int("output_size", output_size)

    def init(key, input_size: int, dtype=jnp.float32):
        kc, ky = jax.random.split(key)
        cell_params = cell.init(kc, input_size, dtype)
        x = jax.ShapeDtypeStruct((input_size,), dtype)
        _, h = jax.eval_shape(cell.step, cell_params, cell.initial_carry((), dtype), x)
        return {
            "cell": cell_params,
            "W_hy": _lecun_normal(ky, (h.shape[-1], output_size), dtype),
            "b_y": jnp.zeros((output_size,), dtype),
        }

    def step(params, carry, x):
        _check_params("with_readout", params, ("cell", "W_hy", "b_y"))
        carry, h = cell.step(params["cell"], carry, x)
        return carry, _dense(h, params["W_hy"], params["b_y"])

    def make_kernel(params, carry, u):
        return _readout_kernel(kernel_for(cell.step, params["cell"], carry, u))

    inner = cell.step
    if not isinstance(inner, Step) or inner.closure is None:  # the readout itself assumes nothing of the batch
        readout = Step(step, make_kernel, same_batch=getattr(inner, "same_batch", False))
        if getattr(inner, "inverse", None) is not None:  # the readout keeps the carry, so the inverse is the cell's
            readout.inverse = lambda params, carry, x: inner.inverse(params["cell"], carry, x)
        return Cell(init, cell.initial_carry, readout)
    # The inner step's declared closure (resettable's initial carry) stays declared, so the kernel is kept.
    opened = with_readout(Cell(cell.init, cell.initial_carry, inner.opened), output_size).step
    opened = reparametrized(opened, lambda pc: {**pc[0], "cell": (pc[0]["cell"], pc[1])})
    return Cell(init, cell.initial_carry, closed(step, opened, inner.closure))
