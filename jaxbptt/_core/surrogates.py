"""The option surrogates: a plain `lax.scan` whose JAX autodiff has the meaning of every gradient
option. The autodiff method differentiates them; `jaxbptt.reference_unroll` exposes them.

- chunked truncation: the carry entering step t passes through `cut` when `t > 0 and t % k == 0`;
- Williams-Peng truncation: each chunk of k1 steps re-runs its window of k2 steps from
  `cut(carry entering the window)` (the initial carry itself when the window starts at 0), and
  only the chunk's own outputs are taken from that re-run;
- clipping: the carry entering each step passes through `clip_identity`, whose VJP rescales the
  cotangent to norm at most `clip_norm` (over the whole carry, or per row of its batch axis).

`cut` is an identity whose VJP is zero. Unlike `lax.stop_gradient`, it keeps how the cut carry
depends on the parameters when the gradient itself is differentiated (`jax.hessian`, grad of grad,
`jax.jvp` of the gradient): the derivative of a truncated gradient is then the derivative of the
gradient the options define, exactly as through the reverse-scan engine, whatever the method.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from .._engine.kernel import is_float
from .._engine.reverse import global_norm
from .._types import PyTree
from .options import Options


@jax.custom_vjp
def cut(tree: PyTree) -> PyTree:
    """Identity whose cotangent is zero: where truncation stops the backward pass."""
    return tree


def _cut_fwd(tree):
    return tree, None


def _cut_bwd(_, ct):
    return (jax.tree.map(lambda c: c if c.dtype == jax.dtypes.float0 else jnp.zeros_like(c), ct),)


cut.defvjp(_cut_fwd, _cut_bwd)


@jax.custom_vjp
def clip_identity(tree: PyTree, clip_norm) -> PyTree:
    """Identity whose VJP rescales the cotangent to global L2 norm at most `clip_norm`.

    The norm is taken over every leaf of the pytree jointly; `jax.vmap` of it over a batch axis
    clips each row on its own. This is the per-step clipping of `jaxbptt.value_and_grad`'s
    `clip_norm` as a building block for your own scans.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> g = jax.grad(lambda x: jnp.sum(3.0 * jb.clip_identity(x, 1.0)))(jnp.ones(4))
      >>> float(jnp.linalg.norm(g))
      1.0
    """
    del clip_norm
    return tree


def _clip_fwd(tree, clip_norm):
    return tree, clip_norm


def _clip_bwd(clip_norm, ct):
    floats = [c[None] for c in jax.tree.leaves(ct) if c.dtype != jax.dtypes.float0]
    norm = global_norm(floats)[0]
    scale = jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > clip_norm, norm, 1), 1)
    scaled = jax.tree.map(lambda c: c if c.dtype == jax.dtypes.float0 else (c * scale).astype(c.dtype), ct)
    return scaled, jnp.zeros_like(clip_norm)


clip_identity.defvjp(_clip_fwd, _clip_bwd)


def _step_input(carry, t, opts: Options, perturbation):
    """The carry as step t sees it: through the clipping identity, plus the zero perturbation."""
    if opts.clip_norm is not None:
        clip = clip_identity if opts.clip_scope == "batch" else jax.vmap(clip_identity, in_axes=(0, None))
        carry = clip(carry, opts.clip_norm)
    if perturbation is not None:
        eps = jax.tree.map(lambda e: e[t], perturbation)
        carry = jax.tree.map(lambda c, e: c + e if is_float(c) else c, carry, eps)
    return carry


def _where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def surrogate_unroll(step, params, carry, xs, length: int, opts: Options, *, checkpoint: bool = False,
                     perturbation=None, head=None, targets=None):
    """`(final_carry, ys)` of the plain scan (time-major), through the option surrogates.

    `checkpoint=True` scans `jax.checkpoint(step)`: the backward pass stores each step's carry
    and input only and recomputes the step's residuals. `perturbation` (a pytree like the carry
    with a leading time axis) is added to the carry entering each step, after clipping; its
    gradient is the cotangent of that carry before clipping (the diagnostics). With `head`, a
    function `head(y_t, target_t)` (a per-step loss), the scan returns its values instead of `ys`,
    evaluated inside the loop as `jax.grad` through `lax.scan` of a summed loss would, so that
    the outputs are never stored whole.
    """
    if checkpoint:
        step = jax.checkpoint(step)
    if opts.truncation.windows:
        final, ys = _williams_peng(step, params, carry, xs, length, opts, perturbation)
        return final, ys if head is None else jax.vmap(head)(ys, targets)
    trunc = opts.truncation
    indexed = trunc.active or perturbation is not None

    def body(c, inputs):
        t, x, target = inputs
        if trunc.active:
            c = _where((t % trunc.chunk == 0) & (t > 0), cut(c), c)
        c, y = step(params, _step_input(c, t, opts, perturbation), x)
        return c, y if head is None else head(y, target)

    return lax.scan(body, carry, (jnp.arange(length) if indexed else None, xs, targets), length=length,
                    unroll=opts.unroll)


def _williams_peng(step, params, carry, xs, length, opts: Options, perturbation):
    k1, k2 = opts.truncation.chunk, opts.truncation.window
    window = min(k2, length)
    _, carries_in = lax.scan(lambda c, x: (step(params, c, x)[0], c), carry, xs, length=length)

    def run_chunk(_, j):
        end = jnp.minimum((j + 1) * k1, length)
        start = jnp.maximum(0, (j + 1) * k1 - k2)
        entering = cut(jax.tree.map(lambda a: a[start], carries_in))
        c0 = _where(start == 0, carry, entering)

        def inner(c, s):
            t = end - window + s
            active = t >= start
            tc = jnp.clip(t, 0, length - 1)
            x = jax.tree.map(lambda a: a[tc], xs)
            new_c, y = step(params, _step_input(c, tc, opts, perturbation), x)
            return _where(active, new_c, c), (y, tc, active & (t >= j * k1))

        c_end, (ys, ts, own) = lax.scan(inner, c0, jnp.arange(window))
        return None, (c_end, ys, ts, own)

    _, (finals, ys, ts, own) = lax.scan(run_chunk, None, jnp.arange(math.ceil(length / k1)))
    ts, own = ts.reshape(-1), own.reshape(-1)

    def assemble(y):
        y = y.reshape((-1,) + y.shape[2:])
        kept = jnp.where(own.reshape((-1,) + (1,) * (y.ndim - 1)), y, 0)
        return jnp.zeros((length,) + y.shape[1:], y.dtype).at[ts].add(kept)

    return jax.tree.map(lambda a: a[-1], finals), jax.tree.map(assemble, ys)
