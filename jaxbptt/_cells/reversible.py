"""Invertible steps: `invertible` declares a step's inverse, `coupled` builds one from any two
functions, and `revgru` / `revlstm` (in `_cells/revcells.py`) are exactly invertible cells.

A step is invertible when `inverse(params, carry_next, x)` gives back the carry that entered it.
`remat=jaxbptt.Invert()` then keeps no carry at all during the forward pass: the reverse scan
rebuilds each block's starting carry from its final one by running the inverse backwards.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from .. import _validate as v
from .._engine.kernel import Step
from .._types import PyTree, StepFn


def invertible(step: StepFn, inverse: Callable) -> StepFn:
    """Declare the inverse of `step`, so that `remat=jaxbptt.Invert()` can rebuild carries with it.

    `inverse(params, carry_next, x) -> carry` must undo `step(params, carry, x) -> (carry_next, y)`:
    `inverse(params, step(params, carry, x)[0], x) == carry`. The gradients under `Invert()` are those
    of the carries the inverse rebuilds, so they equal the stored-activation gradients to the extent
    that the inverse is exact (bit for bit for `revgru` / `revlstm`, up to rounding for `coupled`).

    Args:
      step: `step(params, carry, x) -> (carry, y)`; a `jaxbptt.Step` stays one (its kernel is kept).
      inverse: `inverse(params, carry_next, x) -> carry`, pure, with the carry's structure, shapes and
        dtypes.

    Returns:
      The same step, with the inverse attached as its `inverse` attribute.

    Raises:
      TypeError: `step` or `inverse` is not callable.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> step = jb.invertible(lambda w, h, x: (h + jnp.tanh(w * x), h), lambda w, h, x: h - jnp.tanh(w * x))
      >>> xs = jnp.linspace(0.0, 1.0, 8)
      >>> loss = lambda y, t: (y - t) ** 2
      >>> (_, final), g = jb.value_and_grad(step, loss, remat=jb.Invert())(2.0, 0.0, xs, jnp.zeros(8))
      >>> (_, _), g_stored = jb.value_and_grad(step, loss)(2.0, 0.0, xs, jnp.zeros(8))
      >>> bool(jnp.allclose(g, g_stored)), bool(jnp.allclose(step.inverse(2.0, step(2.0, 0.5, 1.0)[0], 1.0), 0.5))
      (True, True)
    """
    v.check_callable("step", step)
    v.check_callable("inverse", inverse)
    if isinstance(step, Step):
        declared = Step(step, step.make_kernel, same_batch=step.same_batch, closure=step.closure, opened=step.opened)
    else:
        declared = functools.wraps(step)(lambda params, carry, x: step(params, carry, x))
    declared.inverse = inverse
    return declared


def _check_like(name: str, got: PyTree, like: PyTree, what: str) -> None:
    """`got` must have `like`'s pytree structure and shapes (it is cast to `like`'s dtypes)."""
    if jax.tree.structure(got) != jax.tree.structure(like) or any(
        np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(like))
    ):
        raise TypeError(f"{name} must return a pytree like {what} (the same structure and shapes); got "
                        f"{jax.eval_shape(lambda: got)} for {what} {jax.eval_shape(lambda: like)}.")


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def _subtract(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x - y.astype(x.dtype), a, b)


def coupled(f: Callable, g: Callable) -> StepFn:
    """An additive-coupling step, invertible for any `f` and `g` (up to float rounding).

    With params `(pf, pg)` and carry `(h1, h2)` (any two pytrees)::

      h1' = h1 + f(pf, h2, x)
      h2' = h2 + g(pg, h1', x)          y = (h1', h2')

    and the inverse `h2 = h2' - g(pg, h1', x)`, `h1 = h1' - f(pf, h2, x)` (as in NICE, Dinh et al.
    2015, and RevNets, Gomez et al. 2017). Each addition rounds, so the carry the inverse rebuilds
    differs from the stored one by a few units in the last place per step, and the difference grows
    with the number of steps inverted: under `remat=jaxbptt.Invert()`, the whole sequence, back from
    the final carry (the guide "Reversible steps" gives measured errors; prefer float64 for long
    sequences).

    Args:
      f: `f(pf, h2, x) -> update of h1`, a pytree like `h1`.
      g: `g(pg, h1, x) -> update of h2`, a pytree like `h2`.

    Returns:
      An invertible step (see `jaxbptt.invertible`) with params `(pf, pg)` and carry `(h1, h2)`.

    Raises:
      TypeError: `f` or `g` is not callable; at trace time, `params` or `carry` is not a pair, or
        `f` / `g` returns something unlike `h1` / `h2`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> mlp = lambda w, h, x: jnp.tanh(h @ w + x)
      >>> step = jb.coupled(mlp, mlp)
      >>> w = jax.random.normal(jax.random.key(0), (2, 3, 3)) / 2
      >>> carry = (jnp.zeros(3), jnp.ones(3))
      >>> new, y = step((w[0], w[1]), carry, jnp.ones(3))
      >>> back = step.inverse((w[0], w[1]), new, jnp.ones(3))
      >>> bool(jnp.allclose(back[0], carry[0]) & jnp.allclose(back[1], carry[1]))
      True
    """
    v.check_callable("f", f)
    v.check_callable("g", g)

    def pairs(params, carry):
        for name, value in (("params", params), ("carry", carry)):
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(f"coupled(f, g) needs {name} as a pair ({'pf, pg' if name == 'params' else 'h1, h2'}); "
                                f"got {type(value).__name__}" + (f" of length {len(value)}." if isinstance(value, (tuple, list)) else "."))
        return params, carry

    def update(fn, name, p, other, x, like, what):
        out = fn(p, other, x)
        _check_like(name, out, like, what)
        return out

    def step(params, carry, x):
        (pf, pg), (h1, h2) = pairs(params, carry)
        h1 = _add(h1, update(f, "f(pf, h2, x)", pf, h2, x, h1, "h1"))
        h2 = _add(h2, update(g, "g(pg, h1, x)", pg, h1, x, h2, "h2"))
        return (h1, h2), (h1, h2)

    def inverse(params, carry, x):
        (pf, pg), (h1, h2) = pairs(params, carry)
        h2 = _subtract(h2, update(g, "g(pg, h1, x)", pg, h1, x, h2, "h2"))
        h1 = _subtract(h1, update(f, "f(pf, h2, x)", pf, h2, x, h1, "h1"))
        return (h1, h2)

    return invertible(step, inverse)
