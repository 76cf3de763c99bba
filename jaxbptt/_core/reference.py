"""The autodiff references a user can check the engine against: `reference_value_and_grad` and
`reference_unroll` (JAX autodiff through the option surrogates of `surrogates.py`), and
`check_grads`, which compares `value_and_grad` with the first on concrete inputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import call as calls
from . import layout
from .api import value_and_grad
from .methods import Autodiff
from .options import check_options
from .surrogates import surrogate_unroll


def reference_unroll(step, params, carry, xs, *, truncation=None, clip_norm=None, clip_scope="batch",
                     perturbation=None, time_axis=0):
    """`jaxbptt.unroll` as a plain `lax.scan` surrogate, differentiated by JAX autodiff.

    Forward values are those of the plain scan; JAX's derivatives (of every order, and forward mode
    too) have the meaning of the gradient options.

    Args:
      step, params, carry, xs: as in `jaxbptt.unroll`.
      truncation, clip_norm, clip_scope, time_axis: as in `jaxbptt.unroll`.
      perturbation: None, or a pytree like `carry` with a leading time axis, added to the carry
        entering each step (after clipping). Passing zeros and differentiating with respect to it
        gives the cotangent of the carry entering each step, before clipping: the diagnostics.

    Returns:
      `(final_carry, ys)` with the values of the plain scan, `ys` along `time_axis`.
    """
    check_options(truncation=truncation, clip_norm=clip_norm, clip_scope=clip_scope, time_axis=time_axis)
    call = calls.prepare(step, params, carry, xs, time_axis=time_axis, truncation=truncation, clip_norm=clip_norm,
                         clip_scope=clip_scope)
    final, ys = surrogate_unroll(step, params, call.carry, call.xs, call.length, call.opts, perturbation=perturbation)
    return final, layout.from_time_major(ys, time_axis)


def reference_value_and_grad(step, loss_fn, *, argnums=0, truncation=None, clip_norm=None, clip_scope="batch",
                             has_aux=False, time_axis=0, final_loss=None):
    """`jaxbptt.value_and_grad` computed by JAX autodiff through the option surrogates.

    The same as `jaxbptt.value_and_grad(..., engine="autodiff")`: same call signature, options
    and return structure (without diagnostics). Its derivatives of every order are those of the
    gradient the options define: under truncation, the surrogate's cut is an identity with a zero
    cotangent, not `lax.stop_gradient`, so that how the cut carry depends on the parameters is kept
    when the gradient itself is differentiated.

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
    return value_and_grad(step, loss_fn, argnums=argnums, truncation=truncation, clip_norm=clip_norm,
                          clip_scope=clip_scope, has_aux=has_aux, time_axis=time_axis, final_loss=final_loss,
                          engine=Autodiff())


def _default_rtol(grads) -> float:
    itemsize = min((jnp.dtype(g.dtype).itemsize for g in jax.tree.leaves(grads)), default=8)
    return {8: 1e-8, 4: 1e-4}.get(itemsize, 1e-2)


# The options of `value_and_grad` that change gradients, which the reference takes too.
_REFERENCE_OPTIONS = ("argnums", "truncation", "clip_norm", "clip_scope", "time_axis", "has_aux", "final_loss")


def check_grads(step, loss_fn, params, carry, xs, targets=None, *, rtol=None, **options) -> float:
    """Compare `jaxbptt.value_and_grad` against its autodiff reference on concrete inputs.

    Runs both (jit-compiled) and measures, for the loss and every gradient leaf, the relative error
    `||g - g_ref|| / ||g_ref||` (absolute when `g_ref` is zero).

    Args:
      step, loss_fn, params, carry, xs, targets: as in `jaxbptt.value_and_grad`.
      rtol: the largest relative error accepted; default 1e-8 in float64, 1e-4 in float32, 1e-2
        for 16-bit floats.
      **options: any option of `jaxbptt.value_and_grad` (`has_aux` and `diagnostics` included);
        those that change gradients go to the reference too.

    Returns:
      The largest relative error over the loss and all gradient leaves.

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
    reference_options = {k: options[k] for k in _REFERENCE_OPTIONS if k in options}
    args = (params, carry, xs, targets)
    (loss, *_), grads = value_and_grad(step, loss_fn, **options)(*args)  # jitted, or checked and compiled
    (ref_loss, *_), ref_grads = reference_value_and_grad(step, loss_fn, **reference_options)(*args)
    rtol = _default_rtol(ref_grads) if rtol is None else rtol
    errors = {"loss": _relative_error(loss, ref_loss)}
    for (keypath, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        errors["grads" + jax.tree_util.keystr(keypath)] = _relative_error(g, ref)
    # NaN compares false with everything: rank it worst, and fail unless the error is <= rtol.
    worst = max(errors, key=lambda name: (math.isnan(errors[name]), errors[name]))
    if not errors[worst] <= rtol:
        raise AssertionError(
            f"jaxbptt gradient {worst} differs from the autodiff reference: relative error "
            f"{errors[worst]:.3g} > rtol {rtol:.3g} (options {options})."
        )
    return errors[worst]


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))


