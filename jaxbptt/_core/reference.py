"""The autodiff oracle: plain `lax.scan` surrogates whose `jax.grad` has the semantics of every
gradient option, and `check_grads`, which compares the engine against them.

The surrogates, one per gradient option:
- chunked truncation: the carry entering step t passes through `stop_gradient` when
  `t > 0 and t % k == 0`;
- Williams-Peng truncation: each chunk of k1 steps re-runs its window of k2 steps from
  `stop_gradient(carry entering the window)` (the initial carry itself when the window starts at
  0), and only the chunk's own outputs are taken from that re-run;
- clipping: the carry entering each step passes through an identity whose VJP rescales the
  cotangent to global norm at most `clip_norm`.
Forward values are those of the plain scan. These are slow (Williams-Peng re-runs every window)
and are meant for checking, not training.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._core import layout as _layout
from .. import _validate as v
from .._core.api import check_call, check_layout_options, empty_aux, loss_dtype, stacked_loss, value_and_grad
from .._engine.kernel import is_float
from .._engine.reverse import _global_norm_per_slot, truncation_spec
from .._types import PyTree


@jax.custom_vjp
def clip_identity(tree: PyTree, clip_norm) -> PyTree:
    """Identity whose VJP rescales the cotangent to global L2 norm at most `clip_norm`."""
    del clip_norm
    return tree


def _clip_fwd(tree, clip_norm):
    return tree, clip_norm


def _clip_bwd(clip_norm, ct):
    floats = [c[None] for c in jax.tree.leaves(ct) if c.dtype != jax.dtypes.float0]
    norm = _global_norm_per_slot(floats)[0]
    scale = jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > clip_norm, norm, 1), 1)
    scaled = jax.tree.map(lambda c: c if c.dtype == jax.dtypes.float0 else (c * scale).astype(c.dtype), ct)
    return scaled, jnp.zeros_like(clip_norm)


clip_identity.defvjp(_clip_fwd, _clip_bwd)


def _step_input(carry, t, x, *, clip_norm, perturbation, clip_scope="batch"):
    """The carry as step t sees it: through the clipping identity, plus the zero perturbation.
    Per-example clipping is the clipping identity mapped over the carry's leading batch axis."""
    if clip_norm is not None:
        clip = clip_identity if clip_scope == "batch" else jax.vmap(clip_identity, in_axes=(0, None))
        carry = clip(carry, jnp.asarray(clip_norm))
    if perturbation is not None:
        eps = jax.tree.map(lambda e: e[t], perturbation)
        carry = jax.tree.map(lambda c, e: c + e if is_float(c) else c, carry, eps)
    return carry


def _where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def reference_unroll(step, params, carry, xs, *, truncation=None, clip_norm=None, perturbation=None,
                     clip_scope="batch", time_axis=0):
    """`unroll` as a plain `lax.scan` surrogate, differentiated by JAX autodiff (the oracle).

    Args:
      step, params, carry, xs: as in `jaxbptt.unroll`.
      truncation: None, an int k (may be traced) or a pair (k1, k2).
      clip_norm: None or a float > 0 (may be traced).
      perturbation: None, or a pytree like `carry` with a leading time axis, added to the carry
        entering each step (after clipping). Passing zeros and differentiating with respect to it
        gives the cotangent of the carry entering each step, before clipping: the diagnostics oracle.
      clip_scope: `"batch"` or `"example"`, as in `jaxbptt.value_and_grad`.
      time_axis: 0 (time-major) or 1 (batch-major `xs`, and `ys` returned batch-major).

    Returns:
      `(final_carry, ys)` with the values of the plain scan.
    """
    v.check_truncation(truncation)
    v.check_clip_norm(clip_norm)
    _layout.check_clip_scope(clip_scope)
    _layout.check_time_axis(time_axis)
    xs = _layout.time_major(xs, time_axis)
    final, ys = _reference_unroll(step, params, carry, xs, truncation, dict(
        clip_norm=clip_norm, perturbation=perturbation, clip_scope=clip_scope))
    return final, _layout.from_time_major(ys, time_axis)


def _reference_unroll(step, params, carry, xs, truncation, options):
    length = v.time_length("xs", xs)
    truncation = v.static_truncation(truncation)
    if isinstance(truncation, tuple) and truncation_spec(truncation, length).active:
        return _williams_peng(step, params, carry, xs, length, *truncation, **options)
    chunked = truncation is not None and not isinstance(truncation, tuple)  # an inactive pair is exact

    def body(c, inputs):
        t, x = inputs
        if chunked:
            c = _where((t % truncation == 0) & (t > 0), jax.tree.map(lax.stop_gradient, c), c)
        return step(params, _step_input(c, t, x, **options), x)

    return lax.scan(body, carry, (jnp.arange(length), xs))


def _williams_peng(step, params, carry, xs, length, k1, k2, **options):
    window = min(k2, length)
    _, carries_in = lax.scan(lambda c, x: (step(params, c, x)[0], c), carry, xs)
    carries_in = jax.tree.map(lax.stop_gradient, carries_in)

    def run_chunk(_, j):
        end = jnp.minimum((j + 1) * k1, length)
        start = jnp.maximum(0, (j + 1) * k1 - k2)
        entering = jax.tree.map(lambda a: a[start], carries_in)
        c0 = _where(start == 0, carry, entering)

        def inner(c, s):
            t = end - window + s
            active = t >= start
            tc = jnp.clip(t, 0, length - 1)
            x = jax.tree.map(lambda a: a[tc], xs)
            new_c, y = step(params, _step_input(c, tc, x, **options), x)
            return _where(active, new_c, c), (y, tc, active & (t >= j * k1))

        c_end, (ys, ts, own) = lax.scan(inner, c0, jnp.arange(window))
        return None, (c_end, ys, ts, own)

    chunks = math.ceil(length / k1)
    _, (finals, ys, ts, own) = lax.scan(run_chunk, None, jnp.arange(chunks))
    ts = ts.reshape(-1)
    own = own.reshape(-1)

    def assemble(y):
        y = y.reshape((-1,) + y.shape[2:])
        kept = jnp.where(own.reshape((-1,) + (1,) * (y.ndim - 1)), y, 0)
        return jnp.zeros((length,) + y.shape[1:], y.dtype).at[ts].add(kept)

    return jax.tree.map(lambda a: a[-1], finals), jax.tree.map(assemble, ys)


def reference_value_and_grad(step, loss_fn, *, argnums=0, truncation=None, clip_norm=None, clip_scope="batch",
                             has_aux=False, time_axis=0):
    """The oracle for `jaxbptt.value_and_grad`: `jax.value_and_grad` through `reference_unroll`.

    Same call signature, options and return structure as `jaxbptt.value_and_grad` (without
    diagnostics): a function `(params, carry, xs, targets) -> ((loss, final_carry), grads)`, or
    `((loss, final_carry, aux), grads)` with `has_aux=True`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.elman(4)
      >>> params = model.init(jax.random.key(0), 2)
      >>> mse = lambda y, t: jnp.mean((y - t) ** 2)
      >>> args = (params, model.initial_carry(), jnp.ones((9, 2), jnp.float32), jnp.zeros((9, 4), jnp.float32))
      >>> (l1, _), g1 = jb.reference_value_and_grad(model.step, mse, truncation=3)(*args)
      >>> (l2, _), g2 = jb.value_and_grad(model.step, mse, truncation=3)(*args)
      >>> bool(jnp.allclose(g1["W_hh"], g2["W_hh"], rtol=1e-5, atol=1e-6))
      True
    """
    v.check_callable("step", step)
    v.check_callable("loss_fn", loss_fn)
    v.check_argnums(argnums)
    v.check_truncation(truncation)
    v.check_clip_norm(clip_norm)
    check_layout_options(has_aux, time_axis, clip_scope)
    scalar_loss = _layout.split_aux(loss_fn) if has_aux else loss_fn

    def value_and_grad_fn(params, carry, xs, targets):
        targets = _layout.time_major(targets, time_axis, "targets")
        length, carry = check_call(step, scalar_loss, argnums, params, carry, _layout.time_major(xs, time_axis), targets)
        dtype = loss_dtype(step, scalar_loss, params, carry, _layout.time_major(xs, time_axis), targets)
        if clip_norm is not None and clip_scope == "example":
            _layout.check_example_rows(carry)

        def total(params, carry, xs):
            final, ys = reference_unroll(step, params, carry, xs, truncation=truncation, clip_norm=clip_norm,
                                         clip_scope=clip_scope, time_axis=time_axis)
            ys = _layout.time_major(ys, time_axis, "ys")
            if not has_aux:
                return (jnp.sum(jax.vmap(loss_fn)(ys, targets)) if length else jnp.zeros((), dtype)), final
            if not length:
                return jnp.zeros((), dtype), (final, empty_aux(loss_fn, v.first_step(ys), targets))
            loss, aux = stacked_loss(loss_fn, ys, targets)
            return loss, (final, aux)

        (loss, aux), grads = jax.value_and_grad(total, argnums, has_aux=True)(params, carry, xs)
        return ((loss, *aux) if has_aux else (loss, aux)), grads

    return jax.jit(value_and_grad_fn)  # one compiled program even when called outside jit


def _default_rtol(grads) -> float:
    itemsize = min((jnp.dtype(g.dtype).itemsize for g in jax.tree.leaves(grads)), default=8)
    return {8: 1e-8, 4: 1e-4}.get(itemsize, 1e-2)


def check_grads(step, loss_fn, params, carry, xs, targets, *, rtol=None, **options) -> float:
    """Compare `jaxbptt.value_and_grad` against its autodiff oracle on concrete inputs.

    Runs both (jit-compiled) and measures, for every gradient leaf, the relative error
    `||g - g_ref|| / ||g_ref||` (absolute when `g_ref` is zero).

    Args:
      step, loss_fn, params, carry, xs, targets: as in `jaxbptt.value_and_grad`.
      rtol: the largest relative error accepted; default 1e-8 in float64, 1e-4 in float32, 1e-2
        for 16-bit floats.
      **options: `argnums`, `truncation`, `clip_norm`, `clip_scope`, `time_axis`, `remat`, `unroll`,
        `check_finite` for `jaxbptt.value_and_grad`;
        those that change gradients go to the oracle too.

    Returns:
      The largest relative error over all gradient leaves.

    Raises:
      AssertionError: naming the worst leaf, when its error exceeds `rtol`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.gru(8)
      >>> params = model.init(jax.random.key(0), 3)
      >>> mse = lambda y, t: jnp.mean((y - t) ** 2)
      >>> err = jb.check_grads(model.step, mse, params, model.initial_carry((2,)),
      ...                      jnp.ones((30, 2, 3), jnp.float32), jnp.zeros((30, 2, 8), jnp.float32), truncation=(5, 10))
      >>> err < 1e-4
      True
    """
    reference_options = {k: options[k] for k in ("argnums", "truncation", "clip_norm", "clip_scope", "time_axis")
                         if k in options}
    args = (params, carry, xs, targets)
    fn = value_and_grad(step, loss_fn, **options)
    (loss, _), grads = (fn if options.get("check_finite") else jax.jit(fn))(*args)  # checked: compiles itself
    (ref_loss, _), ref_grads = jax.jit(reference_value_and_grad(step, loss_fn, **reference_options))(*args)
    rtol = _default_rtol(ref_grads) if rtol is None else rtol
    errors = {"loss": _relative_error(loss, ref_loss)}
    for (keypath, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        errors["grads" + jax.tree_util.keystr(keypath)] = _relative_error(g, ref)
    # NaN compares false with everything: rank it worst, and fail unless the error is <= rtol.
    worst = max(errors, key=lambda name: (math.isnan(errors[name]), errors[name]))
    if not errors[worst] <= rtol:
        raise AssertionError(
            f"jaxbptt gradient {worst} differs from the autodiff oracle: relative error "
            f"{errors[worst]:.3g} > rtol {rtol:.3g} (options {options})."
        )
    return errors[worst]


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))
