"""`linear_scan`: the elementwise linear recurrence `h_t = a_t * h_{t-1} + b_t` in O(log T) depth.

The pairs `(a_t, b_t)` compose associatively, `(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)`, so
`lax.associative_scan` computes every `h_t` at once. The gradient is hand-written: the adjoint of a
linear recurrence is the same recurrence run the other way,

    lambda_t = g_t + a_{t+1} lambda_{t+1},   dL/db_t = lambda_t,   dL/da_t = lambda_t h_{t-1},

so the backward pass is one reverse associative scan whose residuals are `a`, the states `hs` and
`h0`; JAX's autodiff of `associative_scan` would instead keep the intermediate tree of the forward
scan and transpose it level by level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _validate as v
from ._types import PyTree


def _combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


def _scan(a, b, h0, reverse: bool):
    """One leaf: `a`, `b` of shape (T, ...) and `h0` of shape (...), all of one dtype."""
    first = -1 if reverse else 0
    b = jnp.asarray(b).at[first].add(a[first] * h0)
    return lax.associative_scan(_combine, (a, b), reverse=reverse)[1]


def _shift(x, fill, toward_start: bool):
    """`x` moved one step along time, `fill` (shaped like one step) entering at the vacated end."""
    if toward_start:
        return jnp.concatenate([x[1:], fill[None]])
    return jnp.concatenate([fill[None], x[:-1]])


@jax.custom_vjp
def _scan_forward(a, b, h0):
    return _scan(a, b, h0, False)


@jax.custom_vjp
def _scan_reverse(a, b, h0):
    return _scan(a, b, h0, True)


def _make_rules(reverse: bool):
    def fwd(a, b, h0):
        hs = _scan(a, b, h0, reverse)
        return hs, (a, hs, h0)

    def bwd(res, g):
        a, hs, h0 = res
        # lambda_t = g_t + a_next_t * lambda_next_t, run against the forward direction; JAX's
        # cotangents of complex products are transposes (no conjugation), so a enters as is.
        zero = jnp.zeros_like(h0)
        a_next = _shift(a, zero, toward_start=not reverse)
        lam = _scan(a_next, g, zero, not reverse)
        h_prev = _shift(hs, h0, toward_start=reverse)
        first = -1 if reverse else 0
        return lam * h_prev, lam, a[first] * lam[first]

    return fwd, bwd


_scan_forward.defvjp(*_make_rules(False))
_scan_reverse.defvjp(*_make_rules(True))


def _check(a: PyTree, b: PyTree, h0: PyTree) -> int:
    length = v.time_length("b", b)
    b_struct = jax.tree.structure(b)
    for name, tree in (("a", a), ("h0", h0)):
        if jax.tree.structure(tree) != b_struct:
            raise TypeError(
                f"linear_scan: {name} must have the pytree structure of b; got {jax.tree.structure(tree)} "
                f"but b has {b_struct}."
            )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(b)]
    for path, a_, b_, h_ in zip(paths, jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(h0)):
        for name, leaf in (("a", a_), ("b", b_), ("h0", h_)):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError(
                    f"linear_scan: {name}{path} must be a float or complex array; got dtype "
                    f"{jnp.result_type(leaf).name}."
                )
        if np.shape(h_) != np.shape(b_)[1:]:
            raise ValueError(
                f"linear_scan: h0{path} must have the shape of one step of b{path}, {np.shape(b_)[1:]}; "
                f"got {np.shape(h_)}."
            )
        try:
            broadcast = np.broadcast_shapes(np.shape(a_), np.shape(b_))
        except ValueError:
            broadcast = None
        if broadcast != np.shape(b_):
            raise ValueError(
                f"linear_scan: a{path} must broadcast against b{path} of shape {np.shape(b_)} (time "
                f"leading, e.g. {np.shape(b_)}, {np.shape(b_)[-1:]} or ()); got shape {np.shape(a_)}."
            )
    return length


def linear_scan(a: PyTree, b: PyTree, h0: PyTree, *, reverse: bool = False) -> PyTree:
    """All states of the linear recurrence `h_t = a_t * h_{t-1} + b_t`, by an associative scan.

    Equivalent to::

      def linear_scan(a, b, h0):   # one leaf, a broadcast to b's shape
        hs, h = [], h0
        for t in range(len(b)):
          h = a[t] * h + b[t]
          hs.append(h)
        return jnp.stack(hs)

    but computed by `lax.associative_scan` in O(log T) depth, elementwise over every leaf. Time is
    the leading axis of `b`. With `reverse=True` the recurrence runs backwards,
    `h_t = a_t * h_{t+1} + b_t` from `h_T = h0`, and `hs[0]` is the last state reached.

    Differentiable with respect to `a`, `b` and `h0` by a hand-written VJP: one reverse associative
    scan of the adjoint recurrence `lambda_t = g_t + a_{t+1} lambda_{t+1}` (cotangents follow JAX's
    convention for complex numbers: transposes, not conjugates).

    Args:
      a: the decays: a pytree with the structure of `b`, each leaf broadcastable against the leaf of
        `b` (shape `(T, ...)` for a time-varying decay, `(...)` or `()` for a shared one).
      b: the inputs: a pytree of arrays shaped `(T, ...)`, float or complex.
      h0: the initial state: the structure of `b`, each leaf shaped like one step of `b`.
      reverse: run the recurrence from the last step to the first.

    Returns:
      `hs`, with the structure of `b`: each leaf `(T, ...)` of dtype `result_type(a, b, h0)`.

    Raises:
      TypeError: for pytrees of different structures or integer leaves.
      ValueError: for `b` without a common leading axis, an `h0` leaf not shaped like one step of
        `b`, or an `a` leaf that does not broadcast against `b`.

    Examples:
      >>> import jax.numpy as jnp, jaxbptt as jb
      >>> hs = jb.linear_scan(jnp.full((4, 1), 0.5), jnp.ones((4, 1)), jnp.zeros(1))
      >>> hs[:, 0].tolist()
      [1.0, 1.5, 1.75, 1.875]
      >>> jb.linear_scan(jnp.float32(0.5), jnp.ones(4), jnp.float32(0.0), reverse=True).tolist()
      [1.875, 1.75, 1.5, 1.0]
    """
    if not isinstance(reverse, bool):
        raise TypeError(f"linear_scan: reverse must be a bool; got {reverse!r}.")
    length = _check(a, b, h0)
    scan = _scan_reverse if reverse else _scan_forward

    def leaf(a_, b_, h_):
        dtype = jnp.result_type(a_, b_, h_)
        b_ = jnp.asarray(b_, dtype)
        if length == 0:
            return b_
        a_ = jnp.broadcast_to(jnp.asarray(a_, dtype), b_.shape)
        return scan(a_, b_, jnp.asarray(h_, dtype))

    return jax.tree.map(leaf, a, b, h0)
