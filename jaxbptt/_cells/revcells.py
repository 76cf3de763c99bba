"""RevGRU and RevLSTM (MacKay, Vicol, Ba, Grosse, "Reversible Recurrent Neural Networks", NeurIPS
2018): gated cells whose step is exactly invertible in finite precision.

The hidden state is split into halves, each updated from the other as in additive coupling, with a
forget gate bounded below by 2**-max_forget_bits, and kept in fixed point; the bits that forgetting
removes go to an integer buffer carried along (`_cells/fixed_point.py`). So the inverse rebuilds
every carry bit for bit, and `remat=jaxbptt.Invert()` needs neither stored activations nor
checkpoints. The carry holds the exact fixed-point state (integers) and its value as floats, which
is the leaf gradients flow through: the quantisations pass gradients straight through, so the
gradient is that of the real-valued update, and `jax.grad` through `lax.scan` of the step is the
oracle.

Each cell's step is a `jaxbptt.Step` with a hand-derived kernel, as the built-in cells: the reverse
loop carries only the float state's adjoint, the parameter gradients are matrix products per block,
and the kernel's `inverse` also returns the step's residuals (the gates it recomputes to undo the
step), so under `Invert()` no block is run forward twice.

This differs from the paper's code in: 1. the buffer's capacity is fixed by `max_steps` (see
`fixed_point.Buffer`); 2. the attention slice (`slice_dim`) and the sequence masks of its NMT models
are left out (`jaxbptt.masked` pads sequences); 3. weights are initialised as the built-in cells'.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._cells import fixed_point as fx
from .._cells.reversible import invertible
from .._cells.rnn import (Cell, _activate, _activation_slope, _check_positive_int, _check_step_args, _dense, _dense_t,
                          _lecun_normal, _no_consts, _orthogonal, _outer_sum)
from .._engine.kernel import Kernel, Step


class RevGRUState(NamedTuple):
    """The RevGRU carry.

    Attributes:
      h: shape=(*batch, H), float: the hidden state's value, `h_fixed / 2**23` (the cell's output y);
        gradients flow through it.
      h_fixed: shape=(*batch, H), int64 (int32 without x64): the hidden state in fixed point.
      buffer: the bits forgetting removed, H units (`jaxbptt.revgru`'s `max_steps` sizes it).
    """

    h: jax.Array
    h_fixed: jax.Array
    buffer: fx.Buffer


class RevLSTMState(NamedTuple):
    """The RevLSTM carry: `h` and `c` as in `RevGRUState`, the buffer over 2H units (h's, then c's).

    Attributes:
      h: shape=(*batch, H), float: the hidden state's value (the cell's output y).
      c: shape=(*batch, H), float: the memory cell's value.
      h_fixed: shape=(*batch, H), int: `h` in fixed point.
      c_fixed: shape=(*batch, H), int: `c` in fixed point.
      buffer: the bits forgetting removed from h and c, 2H units.
    """

    h: jax.Array
    c: jax.Array
    h_fixed: jax.Array
    c_fixed: jax.Array
    buffer: fx.Buffer


def _check_options(hidden_size: int, max_forget_bits: int, max_steps: int) -> None:
    _check_positive_int("hidden_size", hidden_size)
    if hidden_size % 2:
        raise ValueError(f"hidden_size must be even (the state is two halves, each updated from the other); got "
                         f"{hidden_size}.")
    if isinstance(max_forget_bits, bool) or not isinstance(max_forget_bits, int) or not 1 <= max_forget_bits <= fx.FORGET_RADIX:
        raise ValueError(f"max_forget_bits must be an int in [1, {fx.FORGET_RADIX}] (bits a unit may forget per step); "
                         f"got {max_forget_bits!r}.")
    _check_positive_int("max_steps", max_steps)


def _value(state_value, fixed):
    """The state's exact value, with the float leaf's derivative."""
    return fx.straight_through(fx.to_float(fixed, state_value.dtype), state_value)


def _gate(bits: int, s):
    """The forget gate bounded to [2**-bits, 1] from a sigmoid, its fixed-point integers, and its
    quantised value with the bounded gate's derivative (straight through)."""
    low = 2.0**-bits
    z = low + (1 - low) * s
    n = fx.gate_fixed(z, bits, fx.int_dtype())
    return z, n, fx.straight_through(n.astype(z.dtype) / 2**fx.FORGET_RADIX, z)


def _update(fixed, word, n, increment):
    """`fixed * z + increment` in fixed point, exactly invertible by `_undo`."""
    fixed, word = fx.forget(fixed, n.astype(fixed.dtype), word)
    return fixed + fx.to_fixed(increment, fixed.dtype), word


def _undo(fixed, word, n, increment):
    return fx.remember(fixed - fx.to_fixed(increment, fixed.dtype), n.astype(fixed.dtype), word)


def _halves(a):
    n = a.shape[-1] // 2
    return a[..., :n], a[..., n:]


def _join(*parts):
    return jnp.concatenate(parts, axis=-1)


# ------------------------------------------------------------------------------------------------ RevGRU


def revgru(hidden_size: int, *, max_forget_bits: int = 3, max_steps: int = 1000) -> Cell:
    """RevGRU (MacKay et al. 2018): a GRU in two coupled halves whose step is exactly invertible.

    With `h = [h1, h2]` (H/2 units each), `x` the input and `u = x @ W_x + b` split into
    `[u_zr1 (H), u_g1 (H/2), u_zr2 (H), u_g2 (H/2)]`::

      [z1, r1] = sigmoid(u_zr1 + h2 @ W_zr1),  z1 bounded: 2**-max_forget_bits + (1 - 2**-max_forget_bits) z1
      g1 = tanh(u_g1 + (r1 * h2) @ W_g1)
      h1' = z1 * h1 + (1 - z1) * g1
      [z2, r2], g2 likewise from h1' (W_zr2, W_g2);  h2' = z2 * h2 + (1 - z2) * g2;  y = h' = [h1', h2']

    computed in fixed point (23 fractional bits; z with 10) so that each unit forgets at most
    `max_forget_bits` bits per step, and those bits are kept in the carry's buffer: the step's
    `inverse` (`cell.step.inverse(params, carry_next, x)`) gives back the carry bit for bit, and
    `remat=jaxbptt.Invert()` uses it. Gradients treat the quantisations as the identity (straight
    through), as in the paper.

    The buffer is sized by `max_steps`: it holds the bits forgotten in that many steps whatever the
    gates (about `max_steps * max_forget_bits / 53` int64 words per unit, `/ 21` int32 words without
    x64); beyond, `carry.buffer.lost()` turns true and the carry can no longer be inverted exactly
    (the forward values stay exact). Training without `remat=jaxbptt.Invert()` never inverts:
    `max_steps=1` then keeps the carry small, and neither values nor gradients change.

    Args:
      hidden_size: H, even.
      max_forget_bits: b in [1, 10], the most bits a unit forgets per step (the paper's
        `max_forget = 1 - 2**-b`; it reports 2-5 bits as good as a GRU on language modelling).
      max_steps: the longest sequence whose carries the buffer can rebuild exactly.

    Returns:
      A `Cell` with params `{"W_x": (D, 3H), "b": (3H,), "W_zr1": (H/2, H), "W_g1": (H/2, H/2),
      "W_zr2": (H/2, H), "W_g2": (H/2, H/2)}` and carry `jaxbptt.RevGRUState`.

    Raises:
      ValueError: `hidden_size` odd or not positive, `max_forget_bits` outside [1, 10], `max_steps` < 1.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.revgru(8)
      >>> params, carry = cell.init(jax.random.key(0), 3), cell.initial_carry((2,))
      >>> xs = jax.random.normal(jax.random.key(1), (50, 2, 3))
      >>> final, ys = jax.lax.scan(lambda c, x: cell.step(params, c, x), carry, xs)
      >>> back = jax.lax.scan(lambda c, x: (cell.step.inverse(params, c, x), None), final, xs, reverse=True)[0]
      >>> all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(carry)))
      True
    """
    _check_options(hidden_size, max_forget_bits, max_steps)
    H, n, bits = hidden_size, hidden_size // 2, max_forget_bits
    keys = ("W_x", "b", "W_zr1", "W_g1", "W_zr2", "W_g2")

    def init(key, input_size: int, dtype=jnp.float32):
        _check_positive_int("input_size", input_size)
        k = jax.random.split(key, 5)
        return {"W_x": _lecun_normal(k[0], (input_size, 3 * H), dtype), "b": jnp.zeros((3 * H,), dtype),
                "W_zr1": _orthogonal(k[1], (n, H), dtype), "W_g1": _orthogonal(k[2], (n, n), dtype),
                "W_zr2": _orthogonal(k[3], (n, H), dtype), "W_g2": _orthogonal(k[4], (n, n), dtype)}

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        shape = tuple(batch_shape) + (H,)
        return RevGRUState(jnp.zeros(shape, dtype), jnp.zeros(shape, fx.int_dtype()),
                           fx.empty_buffer(batch_shape, H, fx.capacity(max_steps, bits)))

    def project(params, xs):
        return _dense(xs, params["W_x"], params["b"])

    def gates(params, i, u, other):
        """Half i's sigmoid pair [z, r] (unbounded z) and candidate g, from the other half."""
        u_zr, u_g = (u[..., :H], u[..., H:H + n]) if i == 1 else (u[..., H + n:2 * H + n], u[..., 2 * H + n:])
        zr = _activate("ss", u_zr + _dense(other, params[f"W_zr{i}"]))
        g = jnp.tanh(u_g + _dense(zr[..., n:] * other, params[f"W_g{i}"]))
        return zr, g

    def forward(params, consts, state, u):
        del consts
        value, buffer = _value(state.h, state.h_fixed), fx.push_full(state.buffer)
        (h1, h2), (f1, f2), (w1, w2) = _halves(value), _halves(state.h_fixed), _halves(buffer.word)
        zr1, g1 = gates(params, 1, u, h2)
        z1, n1, zq1 = _gate(bits, zr1[..., :n])
        f1, w1 = _update(f1, w1, n1, (1 - z1) * g1)
        h1 = fx.straight_through(fx.to_float(f1, value.dtype), zq1 * h1 + (1 - z1) * g1)
        zr2, g2 = gates(params, 2, u, h1)
        z2, n2, zq2 = _gate(bits, zr2[..., :n])
        f2, w2 = _update(f2, w2, n2, (1 - z2) * g2)
        h2 = fx.straight_through(fx.to_float(f2, value.dtype), zq2 * h2 + (1 - z2) * g2)
        h = _join(h1, h2).astype(state.h.dtype)
        return RevGRUState(h, _join(f1, f2), buffer._replace(word=_join(w1, w2))), h, _join(zr1, g1, zr2, g2)

    def inverse(params, consts, state, u):
        del consts
        (f1, f2), (w1, w2) = _halves(state.h_fixed), _halves(state.buffer.word)
        h1 = fx.to_float(f1, state.h.dtype)
        zr2, g2 = gates(params, 2, u, h1)
        z2, n2, _ = _gate(bits, zr2[..., :n])
        f2, w2 = _undo(f2, w2, n2, (1 - z2) * g2)
        zr1, g1 = gates(params, 1, u, fx.to_float(f2, state.h.dtype))
        z1, n1, _ = _gate(bits, zr1[..., :n])
        f1, w1 = _undo(f1, w1, n1, (1 - z1) * g1)
        fixed = _join(f1, f2)
        buffer = fx.pop_started(state.buffer._replace(word=_join(w1, w2)))
        return RevGRUState(fx.to_float(fixed, state.h.dtype), fixed, buffer), (state.h, _join(zr1, g1, zr2, g2))

    def half_backward(params, i, ct, this, other, zr, g):
        """Cotangents of half i's old value, of the other half it read, and of its gate pre-activations
        (laid out as its part of u: [zr (H), g (H/2)])."""
        z, _, zq = _gate(bits, zr[..., :n])
        d_g = ct * (1 - z) * (1 - g * g)
        d_v = _dense_t(d_g, params[f"W_g{i}"])  # v = r * other
        d_zr = _join(ct * (this - g) * (1 - 2.0**-bits), d_v * other) * _activation_slope("ss", zr)
        return ct * zq, d_v * zr[..., n:] + _dense_t(d_zr, params[f"W_zr{i}"]), _join(d_zr, d_g)

    def split_res(res):
        return res[..., :H], res[..., H:H + n], res[..., H + n:2 * H + n], res[..., 2 * H + n:]

    def backward(params, consts, h, h_prev, res, ct, ct_out):
        zr1, g1, zr2, g2 = split_res(res)
        (d1, d2), (old1, old2) = _halves(ct.h + ct_out), _halves(h_prev)
        d_old2, d_new1, local2 = half_backward(params, 2, d2, old2, h[..., :n], zr2, g2)
        d_old1, d_other, local1 = half_backward(params, 1, d1 + d_new1, old1, old2, zr1, g1)
        zeros = jax.tree.map(jnp.zeros_like, ct)
        return zeros._replace(h=_join(d_old1, d_old2 + d_other)), _join(local1, local2)

    def grads(params, consts, carry_start, us, outs, h_prevs, res, locals_):
        zr1, _, zr2, _ = split_res(res)
        d_zr1, d_g1, d_zr2, d_g2 = split_res(locals_)
        old2, new1 = h_prevs[..., n:], outs[..., :n]
        dparams = {"W_x": jnp.zeros_like(params["W_x"]), "b": jnp.zeros_like(params["b"]),
                   "W_zr1": _outer_sum(old2, d_zr1), "W_g1": _outer_sum(zr1[..., n:] * old2, d_g1),
                   "W_zr2": _outer_sum(new1, d_zr2), "W_g2": _outer_sum(zr2[..., n:] * new1, d_g2)}
        return dparams, locals_

    def previous_out(state):
        return fx.to_float(state.h_fixed, state.h.dtype)

    kernel = Kernel(_no_consts, project, forward, backward, grads, lambda params, outs: outs, previous_out, inverse)
    return _cell(init, initial_carry, kernel, "revgru", RevGRUState, H, keys)


# ----------------------------------------------------------------------------------------------- RevLSTM


def revlstm(hidden_size: int, *, max_forget_bits: int = 3, max_steps: int = 1000) -> Cell:
    """RevLSTM (MacKay et al. 2018): an LSTM in two coupled halves whose step is exactly invertible.

    With `h = [h1, h2]`, `c = [c1, c2]` (H/2 units each) and `u = x @ W_x + b` split into one part
    per half, half 1 reads h2 (`a1 = u_1 + h2 @ W_h1`, split into `[z, g, f, o, p]`)::

      z = bounded sigmoid, g = tanh, f = sigmoid, o = sigmoid, p = bounded sigmoid
      c1' = z * c1 + f * g
      h1' = p * h1 + o * tanh(c1')

    (bounded: `2**-max_forget_bits + (1 - 2**-max_forget_bits) sigmoid`), then half 2 likewise from
    h1' (`W_h2`); `y = h' = [h1', h2']`. Fixed point, buffer, inverse, gradients and `max_steps` as in
    `jaxbptt.revgru`; the buffer covers h and c (2H units), and the memory cell must stay within the
    fixed-point range (|c| < 2**40, or 2**8 without x64).

    Args:
      hidden_size: H, even.
      max_forget_bits: b in [1, 10], the most bits a unit of h or c forgets per step.
      max_steps: the longest sequence whose carries the buffer can rebuild exactly.

    Returns:
      A `Cell` with params `{"W_x": (D, 5H), "b": (5H,), "W_h1": (H/2, 5H/2), "W_h2": (H/2, 5H/2)}`
      and carry `jaxbptt.RevLSTMState`.

    Raises:
      ValueError: `hidden_size` odd or not positive, `max_forget_bits` outside [1, 10], `max_steps` < 1.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.revlstm(8)
      >>> params, carry = cell.init(jax.random.key(0), 3), cell.initial_carry((2,))
      >>> x = jnp.ones((2, 3))
      >>> new, y = cell.step(params, carry, x)
      >>> back = cell.step.inverse(params, new, x)
      >>> y.shape, all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(carry)))
      ((2, 8), True)
    """
    _check_options(hidden_size, max_forget_bits, max_steps)
    H, n, bits = hidden_size, hidden_size // 2, max_forget_bits
    keys = ("W_x", "b", "W_h1", "W_h2")

    def init(key, input_size: int, dtype=jnp.float32):
        _check_positive_int("input_size", input_size)
        k = jax.random.split(key, 3)
        return {"W_x": _lecun_normal(k[0], (input_size, 5 * H), dtype), "b": jnp.zeros((5 * H,), dtype),
                "W_h1": _orthogonal(k[1], (n, 5 * n), dtype), "W_h2": _orthogonal(k[2], (n, 5 * n), dtype)}

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        shape = tuple(batch_shape) + (H,)
        zeros, fixed = jnp.zeros(shape, dtype), jnp.zeros(shape, fx.int_dtype())
        return RevLSTMState(zeros, zeros, fixed, fixed,
                            fx.empty_buffer(batch_shape, 2 * H, fx.capacity(max_steps, bits)))

    def project(params, xs):
        return _dense(xs, params["W_x"], params["b"])

    def gates(params, i, u, other):
        """Half i's gates [z, g, f, o, p] (z and p unbounded sigmoids), from the other half."""
        return _activate("stsss", _halves(u)[i - 1] + _dense(other, params[f"W_h{i}"]))

    def split_gates(a):
        return [a[..., k * n:(k + 1) * n] for k in range(5)]

    def words(word):  # the buffer's units: h1, h2, c1, c2
        return [word[..., k * n:(k + 1) * n] for k in range(4)]

    def forward(params, consts, state, u):
        del consts
        dtype, buffer = state.h.dtype, fx.push_full(state.buffer)
        (h1, h2), (c1, c2) = _halves(_value(state.h, state.h_fixed)), _halves(_value(state.c, state.c_fixed))
        hf, cf, w = list(_halves(state.h_fixed)), list(_halves(state.c_fixed)), words(buffer.word)
        h, c, a = [h1, h2], [c1, c2], []
        for i in (0, 1):
            a.append(gates(params, i + 1, u, h[1 - i]))
            sz, g, f, o, sp = split_gates(a[i])
            z, nz, zq = _gate(bits, sz)
            p, np_, pq = _gate(bits, sp)
            cf[i], w[2 + i] = _update(cf[i], w[2 + i], nz, f * g)
            c[i] = fx.straight_through(fx.to_float(cf[i], dtype), zq * c[i] + f * g)
            hf[i], w[i] = _update(hf[i], w[i], np_, o * jnp.tanh(c[i]))
            h[i] = fx.straight_through(fx.to_float(hf[i], dtype), pq * h[i] + o * jnp.tanh(c[i]))
        h, c = _join(*h), _join(*c)
        state = RevLSTMState(h, c, _join(*hf), _join(*cf), buffer._replace(word=_join(*w)))
        return state, _join(h, c), _join(*a)

    def inverse(params, consts, state, u):
        del consts
        dtype = state.h.dtype
        hf, cf, w = list(_halves(state.h_fixed)), list(_halves(state.c_fixed)), words(state.buffer.word)
        a = [None, None]
        for i in (1, 0):
            a[i] = gates(params, i + 1, u, fx.to_float(hf[1 - i], dtype))
            sz, g, f, o, sp = split_gates(a[i])
            _, nz, _ = _gate(bits, sz)
            _, np_, _ = _gate(bits, sp)
            hf[i], w[i] = _undo(hf[i], w[i], np_, o * jnp.tanh(fx.to_float(cf[i], dtype)))
            cf[i], w[2 + i] = _undo(cf[i], w[2 + i], nz, f * g)
        h_fixed, c_fixed = _join(*hf), _join(*cf)
        buffer = fx.pop_started(state.buffer._replace(word=_join(*w)))
        previous = RevLSTMState(fx.to_float(h_fixed, dtype), fx.to_float(c_fixed, dtype), h_fixed, c_fixed, buffer)
        return previous, (_join(state.h, state.c), _join(*a))

    def half_backward(params, i, d_h, d_c, h_old, c_old, c_new, a):
        """Cotangents of half i's old h and c, of the other half's h it read, and of its gate
        pre-activations (its part of u)."""
        sz, g, f, o, sp = split_gates(a)
        _, _, zq = _gate(bits, sz)
        _, _, pq = _gate(bits, sp)
        tc = jnp.tanh(c_new)
        d_c = d_c + d_h * o * (1 - tc * tc)
        keep = 1 - 2.0**-bits
        d_a = _join(d_c * c_old * keep, d_c * f, d_c * g, d_h * tc, d_h * h_old * keep) * _activation_slope("stsss", a)
        return d_h * pq, d_c * zq, _dense_t(d_a, params[f"W_h{i}"]), d_a

    def backward(params, consts, out, prev_out, res, ct, ct_out):
        (d_h, d_c), (h_new, c_new), (h_old, c_old) = _halves(_join(ct.h, ct.c) + ct_out), _halves(out), _halves(prev_out)
        (d_h1, d_h2), (d_c1, d_c2), (a1, a2) = _halves(d_h), _halves(d_c), _halves(res)
        (h1_old, h2_old), (c1_old, c2_old), (c1_new, c2_new) = _halves(h_old), _halves(c_old), _halves(c_new)
        dh2_old, dc2_old, d_h1_new, local2 = half_backward(params, 2, d_h2, d_c2, h2_old, c2_old, c2_new, a2)
        dh1_old, dc1_old, d_other, local1 = half_backward(params, 1, d_h1 + d_h1_new, d_c1, h1_old, c1_old, c1_new, a1)
        zeros = jax.tree.map(jnp.zeros_like, ct)
        return zeros._replace(h=_join(dh1_old, dh2_old + d_other), c=_join(dc1_old, dc2_old)), _join(local1, local2)

    def grads(params, consts, carry_start, us, outs, prev_outs, res, locals_):
        d_a1, d_a2 = _halves(locals_)
        h2_old, h1_new = prev_outs[..., n:H], outs[..., :n]
        dparams = {"W_x": jnp.zeros_like(params["W_x"]), "b": jnp.zeros_like(params["b"]),
                   "W_h1": _outer_sum(h2_old, d_a1), "W_h2": _outer_sum(h1_new, d_a2)}
        return dparams, locals_

    def post(params, outs):
        return outs[..., :H]

    def previous_out(state):
        return _join(fx.to_float(state.h_fixed, state.h.dtype), fx.to_float(state.c_fixed, state.c.dtype))

    kernel = Kernel(_no_consts, project, forward, backward, grads, post, previous_out, inverse)
    return _cell(init, initial_carry, kernel, "revlstm", RevLSTMState, H, keys)


def _cell(init, initial_carry, kernel: Kernel, name: str, state_type, hidden_size: int, keys: tuple) -> Cell:
    """The Cell of a reversible kernel: its step (the kernel's forward on one projected input) and the
    step's `inverse`."""

    def check(params, state, x):
        if not isinstance(state, state_type):
            raise TypeError(f"carry of the {name} cell must be a {state_type.__name__} (see its initial_carry); got "
                            f"{type(state).__name__}.")
        _check_step_args(name, params, state.h, x, hidden_size, keys)

    # Jitted: called eagerly, the fixed-point arithmetic would dispatch (and compile) op by op.
    @jax.jit
    def run(params, state, x):
        state, out, _ = kernel.forward(params, (), state, kernel.project(params, x))
        return state, kernel.post(params, out)

    @jax.jit
    def undo(params, state, x):
        return kernel.inverse(params, (), state, kernel.project(params, x))[0]

    def step(params, state, x):
        check(params, state, x)
        return run(params, state, x)

    def inverse(params, state, x):
        check(params, state, x)
        return undo(params, state, x)

    step.__name__ = inverse.__name__ = name
    return Cell(init, initial_carry, invertible(Step(step, lambda params, carry, u: kernel, same_batch=True), inverse))
