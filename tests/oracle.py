"""An oracle for every gradient option that shares no code with jaxbptt's engine or its surrogates:
a Python loop over time (traced once per length: keep T short) that applies `jax.vjp` of the step
and writes truncation, clipping and its scope, the layout and `final_loss` again from their
definitions. Float64 only; its norms are plain square roots of sums of squares."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _norm(leaves, axis=None):
    return jnp.sqrt(sum(jnp.sum(jnp.abs(a) ** 2, axis=axis) for a in leaves))


def clip(ct, c, scope):
    """Rescale the carry cotangent `ct` to norm <= c: one norm over everything, or one per row."""
    leaves = jax.tree.leaves(ct)
    if scope == "batch":
        norm = _norm(leaves)
        scale = jnp.where(norm > c, c / jnp.where(norm > 0, norm, 1), 1.0)
        return jax.tree.map(lambda a: a * scale, ct)
    norm = _norm([a.reshape(a.shape[0], -1) for a in leaves], axis=1)
    scale = jnp.where(norm > c, c / jnp.where(norm > 0, norm, 1), 1.0)
    return jax.tree.map(lambda a: a * scale.reshape((-1,) + (1,) * (a.ndim - 1)), ct)


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def windows(T, truncation):
    """Per chunk of errors `(first, end)`, the step where its backward pass stops: `stop` is the
    first step whose entering carry's cotangent is still propagated past (errors of steps
    [first, end) flow back to the carry entering step `stop`, and no further unless stop == 0)."""
    if truncation is None or T == 0:
        return [(0, T, 0)]
    k1, k2 = (truncation, truncation) if isinstance(truncation, int) else truncation
    out = []
    for j in range(-(-T // k1)):
        first, end = j * k1, min((j + 1) * k1, T)
        out.append((first, end, max(0, (j + 1) * k1 - k2)))
    return out


def value_and_grad(step, loss_fn, params, carry, xs, targets, *, truncation=None, clip_norm=None,
                   clip_scope="batch", final_loss=None, has_aux=False):
    """`((loss, final_carry), (dparams, dcarry, dxs))` with time-major `xs` and `targets`.

    Every chunk of errors runs its own backward pass through its window (Williams-Peng's definition;
    chunked truncation is the window of its own chunk), so nothing is shared between chunks.
    """
    T = jax.tree.leaves(xs)[0].shape[0]
    at = lambda tree, t: jax.tree.map(lambda a: a[t], tree)
    carries, vjps, ys = [carry], [], []
    for t in range(T):
        (new, y), vjp = jax.vjp(step, params, carries[-1], at(xs, t))
        carries.append(new)
        vjps.append(vjp)
        ys.append(y)
    loss, dys = 0.0, []
    for t in range(T):
        if loss_fn is None:
            dys.append(jax.tree.map(jnp.zeros_like, ys[t]))
            continue
        scalar = (lambda y, tt: loss_fn(y, tt)[0]) if has_aux else loss_fn
        value, dy = jax.value_and_grad(scalar)(ys[t], at(targets, t))
        loss, _ = loss + value, dys.append(dy)
    dfinal = _zeros(carries[-1])
    if final_loss is not None:
        value, dfinal = jax.value_and_grad(final_loss)(carries[-1])
        loss = loss + value
    dparams, dcarry = _zeros(params), _zeros(carry)
    dxs = [_zeros(at(xs, t)) for t in range(T)]
    chunks = windows(T, truncation)
    for index, (first, end, stop) in enumerate(chunks):
        last = index == len(chunks) - 1
        a = dfinal if last else _zeros(carry)  # the final carry's error belongs to the last chunk
        for t in reversed(range(stop, end)):
            dy = dys[t] if t >= first else jax.tree.map(jnp.zeros_like, ys[t])
            dp, a, dx = vjps[t]((a, dy))
            dparams, dxs[t] = _add(dparams, dp), _add(dxs[t], dx)
            if clip_norm is not None:
                a = clip(a, clip_norm, clip_scope)
        if stop == 0:
            dcarry = _add(dcarry, a)
    dxs = jax.tree.map(lambda *a: jnp.stack(a), *dxs) if T else _zeros(xs)
    return (loss, carries[-1]), (dparams, dcarry, dxs)
