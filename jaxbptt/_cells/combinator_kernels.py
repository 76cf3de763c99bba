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

from .._engine.kernel import Kernel


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


def _flagged(inner: Kernel, flags, part=lambda params: params):
    """The pieces shared by the kernels of steps whose input is `(x, flags)` and whose `out` is
    `(inner out, flags as float32)`: `prepare`, `project` (the flags pass through) and `previous_out`.
    `part(params)` are the inner kernel's parameters."""

    def prepare(params, carry, u):
        return inner.prepare(part(params), carry, u[0])

    def project(params, xs):
        x, flag = xs
        return inner.project(part(params), x), flag

    previous_out = None
    if inner.previous_out is not None:
        def previous_out(carry):
            return inner.previous_out(carry), jnp.zeros(np.shape(flags), jnp.float32)

    return prepare, project, previous_out


def masked_kernel(inner: Kernel, flags) -> Kernel:
    """The kernel of `masked(step)`, whose input is `(x, m)`; `flags` is one step's `m` (or its spec).

    `out` is `(inner out, m as float32)`: the output map zeroes masked rows, and a float keeps the
    engine's output cotangents plain arrays. Where the inner kernel's `out` is part of its carry (`previous_out`), a masked
    row's `out` is the carry's, so that the next step sees the carry it really receives."""

    prepare, project, previous_out = _flagged(inner, flags)

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

    return Kernel(prepare, project, forward, backward, grads, post, previous_out)


def resettable_kernel(inner: Kernel, fresh, flags) -> Kernel:
    """The kernel of `resettable(step, initial_carry)` with the initial carry as a parameter: its
    params are `(params, initial_carry)` and its input `(x, reset)`. `fresh(initial_carry, carry)`
    is the initial carry broadcast like `carry`, `flags` one step's `reset` (or its spec).

    `out` is `(inner out, reset as float32)`, so the reverse loop knows where to stop the adjoint
    without storing anything more. The gradient of the initial carry is the cotangent of the carry
    entering the inner step, summed over the rows and steps that reset (through `fresh`'s VJP): the
    reverse loop forms it per step in `local`, `grads` sums it over the block."""

    prepare, project, previous_out = _flagged(inner, flags, part=lambda params: params[0])

    def forward(params, consts, carry, u):
        (params, initial), (x, reset) = params, u
        new_carry, out, res = inner.forward(params, consts, _select(reset, fresh(initial, carry), carry), x)
        return new_carry, (out, reset.astype(jnp.float32)), res

    def previous_in(initial, reset, prev_out, like):
        """The inner kernel's previous `out`: the fresh carry's where the step reset."""
        if prev_out is None:
            return None
        start = inner.previous_out(fresh(initial, like))
        return jax.tree.map(lambda s, p: jnp.where(_over_rows(reset, p), s.astype(p.dtype), p), start, prev_out)

    def backward(params, consts, out, prev_out, res, ct_carry, ct_out):
        (params, initial), reset = params, out[1] > 0
        ct_in, local = inner.backward(params, consts, out[0],
                                      previous_in(initial, reset, prev_out and prev_out[0], ct_carry), res, ct_carry,
                                      ct_out[0])
        zeros = jax.tree.map(jnp.zeros_like, ct_in)
        _, fresh_vjp = jax.vjp(lambda i: fresh(i, ct_in), initial)
        (d_initial,) = fresh_vjp(_select(reset, ct_in, zeros))
        return _select(reset, zeros, ct_in), (local, d_initial)

    def grads(params, consts, carry_start, us, outs, prev_outs, res, locals_):
        (params, initial), reset, (locals_, d_initial) = params, outs[1] > 0, locals_
        start = _select(reset[0], fresh(initial, carry_start), carry_start)
        dparams, dus = inner.grads(params, consts, start, us[0], outs[0],
                                   previous_in(initial, reset, prev_outs and prev_outs[0], carry_start), res, locals_)
        d_initial = jax.tree.map(lambda d: jnp.sum(d, axis=0), d_initial)
        return (dparams, d_initial), (dus, _no_cotangent(us[1]))

    def post(params, outs):
        return inner.post(params[0], outs[0])

    return Kernel(prepare, project, forward, backward, grads, post, previous_out)


def stacked_kernel(layers: list[Kernel], residual: bool) -> Kernel:
    """The kernel of `stacked(*steps, residual=...)` from its layers' kernels.

    Per step, layer i's output map and layer i+1's input projection run inside the loop (a layer's
    input is the step's previous layer's output); `out`, `res` and `local` are tuples of the layers'.
    In the reverse loop, layer i+1's input cotangent (its `grads` on one step, whose parameter
    products XLA drops as unused) goes back through that projection and output map into layer i's
    `out` cotangent. After the loop each layer's `grads` runs on the whole block, and the VJP of
    the block's projections gives the projection and output-map parameter gradients as large
    matrix products. A layer's `grads` must form its input cotangents without `carry_start`
    (every built-in does), since the reverse loop does not have it.
    """
    n = len(layers)

    def layer_input(params, outs, i):
        """Layer i's input (i >= 1) from the earlier layers' `out`s (one step or a block)."""
        y = layers[0].post(params[0], outs[0])
        for j in range(1, i):
            y_j = layers[j].post(params[j], outs[j])
            y = jax.tree.map(jnp.add, y_j, y) if residual else y_j
        return y

    def one_step_input(params, outs, i):
        return _one_step(lambda p, o: layer_input(p, o, i), params, outs)

    def projected(params, outs, i):
        return layers[i].project(params[i], layer_input(params, outs, i))

    def pack(items, like):
        return tuple(items) if isinstance(like, tuple) else list(items)

    def prepare(params, carry, u):
        consts, outs = [], []
        for i, layer in enumerate(layers):
            if i:
                u = _one_step(layer.project, params[i], one_step_input(params, outs, i))
            consts.append(layer.prepare(params[i], carry[i], u))
            outs.append(layer.forward(params[i], consts[i], carry[i], u)[1])
        return tuple(consts)

    def project(params, xs):
        return layers[0].project(params[0], xs)

    def forward(params, consts, carry, u):
        new_carry, outs, res = [], [], []
        for i, layer in enumerate(layers):
            if i:
                u = _one_step(layer.project, params[i], one_step_input(params, outs, i))
            c, o, r = layer.forward(params[i], consts[i], carry[i], u)
            new_carry.append(c)
            outs.append(o)
            res.append(r)
        return pack(new_carry, carry), tuple(outs), tuple(res)

    def backward(params, consts, out, prev_out, res, ct_carry, ct_out):
        ct_out, ct_prev, local = list(ct_out), [None] * n, [None] * n
        for i in reversed(range(n)):
            layer = layers[i]
            ct_prev[i], local[i] = layer.backward(params[i], consts[i], out[i], prev_out[i], res[i], ct_carry[i],
                                                  ct_out[i])
            if i:
                u, u_vjp = jax.vjp(lambda o: _one_step(layer.project, params[i], one_step_input(params, o, i)),
                                   out[:i])
                block = jax.tree.map(lambda a: a[None], (u, out[i], prev_out[i], res[i], local[i]))
                _, du = layer.grads(params[i], consts[i], None, *block)
                (ct_below,) = u_vjp(jax.tree.map(lambda d, a: d[0].astype(a.dtype), du, u))
                ct_out[:i] = [jax.tree.map(jnp.add, a, b) for a, b in zip(ct_out[:i], ct_below)]
        return pack(ct_prev, ct_carry), tuple(local)

    def grads(params, consts, carry_start, us, outs, prev_outs, res, locals_):
        dparams = [None] * n
        for i, layer in enumerate(layers):
            us_i = us if i == 0 else projected(params, outs, i)
            dp, dus_i = layer.grads(params[i], consts[i], carry_start[i], us_i, outs[i], prev_outs[i], res[i],
                                    locals_[i])
            dparams[i] = dp if dparams[i] is None else jax.tree.map(jnp.add, dparams[i], dp)
            if i == 0:
                dus = dus_i
                continue
            _, p_vjp = jax.vjp(lambda p: projected(p, outs, i), params)
            (dp_chain,) = p_vjp(jax.tree.map(lambda d, a: d.astype(a.dtype), dus_i, us_i))
            dparams = [g if d is None else d if g is None else jax.tree.map(jnp.add, g, d)
                       for g, d in zip(dparams, dp_chain)]
        return pack(dparams, params), dus

    def post(params, outs):
        return layer_input(params, outs, n)

    def previous_out(carry):
        return tuple(layer.previous_out(c) for layer, c in zip(layers, carry))

    return Kernel(prepare, project, forward, backward, grads, post, previous_out)
