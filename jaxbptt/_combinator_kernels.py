"""Kernels of combinators over kernel-backed steps: a mask or a reset costs a select per step, a
stack composes its layers' kernels, and none of them changes the engine's path.

Each function takes the inner `Kernel`(s) and returns the combined one (see `_kernel.py` for the
protocol). They rely on the inner kernels being row-wise along the batch (every built-in is): a
masked-out row's residuals only ever meet zero cotangents, so they cannot leak into another row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._kernel import Kernel


def _over_rows(flags, leaf):
    return flags.reshape(flags.shape + (1,) * (leaf.ndim - flags.ndim))


def _select(flags, on, off):
    """Per row: `on` where `flags` is true, else `off` (pytrees of one structure)."""
    return jax.tree.map(lambda a, b: jnp.where(_over_rows(flags, a), a, b), on, off)


def _no_cotangent(flags):
    return np.zeros(np.shape(flags), jax.dtypes.float0)


def _one_step(fn, params, tree):
    """A block-level piece (`project`, `post`) applied to one step: a block of length 1."""
    return jax.tree.map(lambda a: a[0], fn(params, jax.tree.map(lambda a: a[None], tree)))


def masked_kernel(inner: Kernel, flags) -> Kernel:
    """The kernel of `masked(step)`, whose input is `(x, m)`; `flags` is one step's `m` (or its spec).

    `out` is `(inner out, m as float32)`: the output map zeroes masked rows, and a float keeps the
    engine's output cotangents plain arrays. Where the inner kernel's `out` is part of its carry (`previous_out`), a masked
    row's `out` is the carry's, so that the next step sees the carry it really receives."""

    def prepare(params, carry, u):
        return inner.prepare(params, carry, u[0])

    def project(params, xs):
        x, m = xs
        return inner.project(params, x), m

    def forward(params, consts, carry, u):
        x, m = u
        new_carry, out, res = inner.forward(params, consts, carry, x)
        if inner.previous_out is not None:
            out = _select(m, out, inner.previous_out(carry))
        return _select(m, new_carry, carry), (out, m.astype(jnp.float32)), res

    def backward(params, consts, out, prev_out, res, ct_carry, ct_out):
        out, m = out[0], out[1] > 0
        zeros = jax.tree.map(jnp.zeros_like, ct_carry)
        ct_prev, local = inner.backward(params, consts, out, None if prev_out is None else prev_out[0], res,
                                        _select(m, ct_carry, zeros), ct_out[0])
        ct_prev = jax.tree.map(jnp.add, ct_prev, _select(m, zeros, ct_carry))  # unchanged rows pass it on
        return ct_prev, local

    def grads(params, consts, carry_start, us, outs, prev_outs, res, locals_):
        dparams, dus = inner.grads(params, consts, carry_start, us[0], outs[0],
                                   None if prev_outs is None else prev_outs[0], res, locals_)
        return dparams, (dus, _no_cotangent(us[1]))

    def post(params, outs):
        out, m = outs[0], outs[1] > 0
        ys = inner.post(params, out)
        return jax.tree.map(lambda y: jnp.where(_over_rows(m, y), y, jnp.zeros((), y.dtype)), ys)

    previous_out = None
    if inner.previous_out is not None:
        def previous_out(carry):
            return inner.previous_out(carry), jnp.zeros(np.shape(flags), jnp.float32)

    return Kernel(prepare, project, forward, backward, grads, post, previous_out)


def resettable_kernel(inner: Kernel, fresh, flags) -> Kernel:
    """The kernel of `resettable(step, initial_carry)`, whose input is `(x, reset)`; `fresh(carry)`
    is the initial carry broadcast like `carry`, `flags` one step's `reset` (or its spec).

    `out` is `(inner out, reset as float32)`, so the reverse loop knows where to stop the adjoint
    without storing anything more."""

    def prepare(params, carry, u):
        return inner.prepare(params, carry, u[0])

    def project(params, xs):
        x, reset = xs
        return inner.project(params, x), reset

    def forward(params, consts, carry, u):
        x, reset = u
        new_carry, out, res = inner.forward(params, consts, _select(reset, fresh(carry), carry), x)
        return new_carry, (out, reset.astype(jnp.float32)), res

    def previous_in(reset, prev_out, like):
        """The inner kernel's previous `out`: the fresh carry's where the step reset."""
        if prev_out is None:
            return None
        start = inner.previous_out(fresh(like))
        return jax.tree.map(lambda s, p: jnp.where(_over_rows(reset, p), s.astype(p.dtype), p), start, prev_out)

    def backward(params, consts, out, prev_out, res, ct_carry, ct_out):
        reset = out[1] > 0
        ct_prev, local = inner.backward(params, consts, out[0], previous_in(reset, prev_out and prev_out[0], ct_carry),
                                        res, ct_carry, ct_out[0])
        return _select(reset, jax.tree.map(jnp.zeros_like, ct_prev), ct_prev), local

    def grads(params, consts, carry_start, us, outs, prev_outs, res, locals_):
        reset = outs[1] > 0
        start = _select(reset[0], fresh(carry_start), carry_start)
        dparams, dus = inner.grads(params, consts, start, us[0], outs[0],
                                   previous_in(reset, prev_outs and prev_outs[0], carry_start), res, locals_)
        return dparams, (dus, _no_cotangent(us[1]))

    def post(params, outs):
        return inner.post(params, outs[0])

    previous_out = None
    if inner.previous_out is not None:
        def previous_out(carry):
            return inner.previous_out(carry), jnp.zeros(np.shape(flags), jnp.float32)

    return Kernel(prepare, project, forward, backward, grads, post, previous_out)
