"""`value_and_grad` and `unroll`: each call checked and resolved once (`call.py`), computed by one
method (`methods.py`; chosen by `cost.py` under `engine="auto"`), and finished once."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from .. import _validate as v
from .._engine.reverse import Diagnostics, zero_length_outputs
from .._types import Carry, LossFn, Params, PyTree, StepFn
from . import call as calls
from . import layout
from .cost import choose
from .methods import as_method, refuse
from .options import check_options


def _used(remat=None, diagnostics=False, check_finite=False, axis_name=None, probe=None) -> dict:
    """The options, by name, that not every method honours (for `methods.refuse`)."""
    named = {"remat": remat, "diagnostics": diagnostics or None, "check_finite": check_finite or None,
             "axis_name": axis_name, "probe": probe}
    return {name: value for name, value in named.items() if value is not None}


def value_and_grad(
    step: StepFn,
    loss_fn: Optional[LossFn],
    *,
    argnums=0,
    truncation=None,
    remat=None,
    clip_norm=None,
    clip_scope: str = "batch",
    diagnostics: bool = False,
    has_aux: bool = False,
    time_axis: int = 0,
    unroll: int = 1,
    check_finite: bool = False,
    axis_name=None,
    engine="auto",
    final_loss: Optional[Callable] = None,
) -> Callable:
    """The sequence loss `L = sum_t loss_fn(y_t, target_t) + final_loss(final_carry)` and its BPTT
    gradient.

    Equivalent to (but faster and lighter than)::

      def loss(params, carry, xs, targets):
        final, ys = lax.scan(lambda c, x: step(params, c, x), carry, xs)
        return jnp.sum(jax.vmap(loss_fn)(ys, targets)) + final_loss(final), final
      jax.value_and_grad(loss, argnums, has_aux=True)

    with the gradient options below, which change the backward pass only: losses, carries and
    outputs are always exact. Time is the leading axis of every leaf of `xs` and `targets`.

    Args:
      step: `step(params, carry, x) -> (carry, y)`; `y` may be None when there is no per-step loss.
      loss_fn: `loss_fn(y_t, target_t) -> scalar`; masks or weights can travel in the targets. None:
        no per-step loss (then `final_loss` is the whole loss and `targets` may be None).
      argnums: int or tuple of ints among 0 (params), 1 (carry), 2 (xs), as in `jax.value_and_grad`.
      truncation: None (exact BPTT); an int k >= 1 (chunked: the carry entering step t is treated
        as a constant when `t > 0 and t % k == 0`; may be a traced integer, to vmap over k); or a
        pair (k1, k2), 1 <= k1 <= k2 (Williams & Peng: the errors of each chunk of k1 steps go back
        through a window of k2 steps, re-run from a constant carry; every loss counted once). The
        final loss, like a cotangent of the final carry, is an error of the last chunk.
      remat: the memory policy: None (the engine stores what is cheaper to store than to
        recompute), `jaxbptt.Every(s)` (or an int s: keep every s-th carry, recompute the rest),
        `jaxbptt.Sqrt()` (or "sqrt": s = ceil(sqrt(T))) or `jaxbptt.Binomial(slots)` (at most
        `slots` stored carries, Griewank's optimal re-run schedule). Gradients are unchanged.
      clip_norm: None, or c > 0: at every step the cotangent of the carry entering it is rescaled to
        norm at most c before it flows further back (per-step clipping; may be traced).
      clip_scope: what one clipping norm covers: `"batch"` (default) the whole carry cotangent,
        so the threshold's meaning depends on the batch size; `"example"` each row of the carry's
        leading batch axis on its own (equal to `jax.vmap` of the unbatched call over examples).
        Diagnostics report the global norm in both scopes; with `"example"`, `clipped` is true at a
        step where any example was rescaled.
      diagnostics: also return `diag` (`jaxbptt.Diagnostics`: per-step adjoint norm and clipped flag).
      has_aux: `loss_fn(y_t, target_t) -> (loss_t, aux_t)`, `aux_t` any pytree of per-step metrics,
        returned stacked over time (leading axis T, whatever `time_axis`).
      time_axis: 0 when time is the leading axis of every leaf of `xs` and `targets` (time-major,
        as `lax.scan`); 1 for batch-major data shaped `(batch, T, ...)` (Flax's default). The result
        equals the time-major call on `swapaxes(0, 1)` data; input gradients come back batch-major.
      unroll: steps per iteration of the inner loops, as in `lax.scan`.
      check_finite: the checked mode, for debugging. Every step's carry and output (forward), every
        carry cotangent and every block's parameter gradient (backward) is checked with
        `jax.experimental.checkify`; the first non-finite value raises `JaxRuntimeError` naming its
        time step (in the backward pass, the first met going back in time). The returned function
        then compiles itself and raises, so call it directly, not under `jit` or `vmap`. By default
        NaN and inf propagate, as in JAX: jaxbptt never masks them.
      axis_name: inside `jax.shard_map` (or `pmap`) over a split batch, the mapped axis over which
        the global norms of clipping and diagnostics are reduced, so that they equal the unsplit
        batch's (see `jaxbptt.data_parallel`).
      engine: the method: "auto" (default: chosen per call by a cost model of the step, made at
        trace time), "reverse" or `jaxbptt.ReverseScan()` (the reverse-scan engine: every option),
        "autodiff" or `jaxbptt.Autodiff(checkpoint=False)` (`jax.grad` through the option
        surrogates; no `remat`, diagnostics, checked mode or `axis_name`). Methods change speed and
        memory, never a result: gradients are equal up to float rounding, as are their derivatives.
      final_loss: `final_loss(final_carry) -> scalar`, added to the loss (the validation loss of
        weights trained by an unrolled loop, say).

    Returns:
      A function `(params, carry, xs, targets=None) -> ((loss, final_carry), grads)`, with `aux`
      then `diag` appended to the first tuple when `has_aux=True` and `diagnostics=True`:
      `((loss, final_carry, aux, diag), grads)`; `grads` is structured by `argnums` as in
      `jax.value_and_grad`. The function is jitted (called outside `jit` it still runs as one
      compiled program) and composes with `jit`, `vmap` and `grad`: derivatives of the gradient
      (`jax.hessian`, grad of grad, `jax.jvp` of it) are those of the gradient the options define,
      so the Jacobian of a truncated or clipped gradient is not symmetric. With
      `check_finite=True` it runs its own compiled, checked program instead (see `check_finite`).

    Raises:
      TypeError / ValueError: at trace time, for a non-callable step or loss, mismatched time axes
        of `xs` and `targets`, a step that changes its carry, a non-scalar loss, options out of
        range, or an option the chosen `engine` does not honour; each message names the argument.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.lstm(32), 1)
      >>> params = model.init(jax.random.key(0), 2)
      >>> xs, targets = jnp.ones((50, 8, 2), jnp.float32), jnp.zeros((50, 8, 1), jnp.float32)
      >>> mse = lambda y, t: jnp.mean((y - t) ** 2)
      >>> f = jax.jit(jb.value_and_grad(model.step, mse, truncation=10, clip_norm=1.0))
      >>> (loss, final), grads = f(params, model.initial_carry((8,)), xs, targets)
      >>> grads["W_hy"].shape
      (32, 1)

      Per-step metrics and batch-major data:

      >>> def loss_and_error(y, t):
      ...   return mse(y, t), {"abs_error": jnp.mean(jnp.abs(y - t))}
      >>> f = jb.value_and_grad(model.step, loss_and_error, has_aux=True, time_axis=1, clip_norm=1.0,
      ...                       clip_scope="example")
      >>> (loss, final, aux), grads = f(params, model.initial_carry((8,)), jnp.ones((8, 50, 2)), jnp.zeros((8, 50, 1)))
      >>> aux["abs_error"].shape
      (50,)

    A loss of the final carry only (an unrolled optimisation: 20 SGD steps on a quadratic, and the
    gradient of the last iterate's loss with respect to the log learning rate):

      >>> def sgd(log_lr, w, x):
      ...   return w - jnp.exp(log_lr) * 2 * (w - x), None
      >>> f = jb.value_and_grad(sgd, None, final_loss=lambda w: jnp.sum(w ** 2))
      >>> (loss, w_final), d_log_lr = f(jnp.log(0.1), jnp.ones(3), jnp.zeros((20, 3)))
      >>> float(d_log_lr) < 0
      True
    """
    v.check_callable("step", step)
    loss = calls.make_loss(loss_fn, has_aux, final_loss)
    nums = v.check_argnums(argnums)
    check_options(truncation=truncation, remat=remat, clip_norm=clip_norm, clip_scope=clip_scope, unroll=unroll,
                  time_axis=time_axis, has_aux=has_aux, diagnostics=diagnostics, check_finite=check_finite,
                  argnums=argnums, final_loss=final_loss)
    method = as_method(engine)
    used = _used(remat, diagnostics, check_finite, axis_name)
    refuse(method, used)

    def value_and_grad_fn(params, carry, xs, targets=None):
        call = calls.prepare(step, params, carry, xs, targets, loss=loss, argnums=nums, time_axis=time_axis,
                             truncation=truncation, clip_norm=clip_norm, clip_scope=clip_scope, remat=remat,
                             diagnostics=diagnostics, unroll=unroll, check_finite=check_finite, axis_name=axis_name)
        if call.length == 0:
            result = calls.zero_length(call)
        else:
            chosen, store = choose(call, used) if method == "auto" else (method, None)
            result = chosen.value_and_grad(call, store)
        out, grads = calls.finish(call, result, time_axis)
        return out, calls.select(argnums, grads)

    if not check_finite:
        return jax.jit(value_and_grad_fn)  # one compiled program even when called outside jit
    checked = jax.jit(checkify.checkify(value_and_grad_fn, errors=checkify.user_checks))

    def checked_value_and_grad_fn(params, carry, xs, targets=None):
        if any(v.is_traced(a) for a in jax.tree.leaves((params, carry, xs, targets))):
            raise ValueError(
                "value_and_grad(..., check_finite=True) compiles and runs its own checked program and raises "
                "from it, so it cannot be traced (jax.jit, jax.vmap, jax.grad, or a jitted make_train_step): "
                "call it, or the train step built on it, on concrete arrays outside jit, or set check_finite=False."
            )
        error, out = checked(params, carry, xs, targets)
        error.throw()
        return out

    return checked_value_and_grad_fn


def diagnostics_probe(length: int, dtype=None) -> Diagnostics:
    """Zeros to pass as `jaxbptt.unroll(..., probe=...)`: the probe's gradient is the diagnostics.

    The forward pass ignores the probe; the reverse scan writes into its cotangent the per-step
    adjoint norm and the clipped flag (as 0.0 / 1.0), so that `jax.grad` with respect to the probe
    returns a `jaxbptt.Diagnostics` of the very backward pass that computed the other gradients.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.elman(8)
      >>> params, xs = cell.init(jax.random.key(0), 2), jnp.ones((30, 2), jnp.float32)
      >>> def loss(params, probe):
      ...   final, ys = jb.unroll(cell.step, params, cell.initial_carry(), xs, clip_norm=0.5, probe=probe)
      ...   return jnp.sum(ys[-1])
      >>> grads, diag = jax.grad(loss, argnums=(0, 1))(params, jb.diagnostics_probe(30))
      >>> diag.adjoint_norm.shape, bool(diag.clipped[-1])
      ((30,), True)
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int (the number of steps); got {length!r}.")
    zeros = jnp.zeros((length,), dtype)  # default: JAX's default float (float64 under x64)
    return Diagnostics(zeros, zeros)


def _check_probe(probe, length: int) -> None:
    if not isinstance(probe, Diagnostics) or any(jnp.shape(a) != (length,) for a in probe):
        raise ValueError(
            f"probe must be jaxbptt.diagnostics_probe({length}) (a Diagnostics of two float arrays of shape "
            f"({length},), T being the length of xs); got {jax.tree.map(jnp.shape, probe)!r}."
        )


def unroll(
    step: StepFn,
    params: Params,
    carry: Carry,
    xs: PyTree,
    *,
    truncation=None,
    remat=None,
    clip_norm=None,
    clip_scope: str = "batch",
    reverse: bool = False,
    unroll: int = 1,
    probe=None,
    engine="auto",
    time_axis: int = 0,
    length: Optional[int] = None,
) -> tuple[Carry, PyTree]:
    """Run `step` over time, with reverse-mode derivatives from the hand-written reverse scan.

    Type: `unroll :: (p -> c -> a -> (c, b)) -> p -> c -> [a] -> (c, [b])`, time being the leading
    axis of every leaf of `xs` and of the returned `ys`. The forward values are exactly those of::

      def unroll(step, params, carry, xs):
        ys = []
        for t in range(T):
          carry, y = step(params, carry, tree_map(lambda a: a[t], xs))
          ys.append(y)
        return carry, tree_map(stack, *ys)

    `jax.grad` (or `jax.vjp`) of any function of `(final_carry, ys)` with respect to `params`,
    `carry` or `xs` runs the reverse scan: the carry adjoint goes back step by step, and parameter
    and input gradients are formed afterwards, block by block, as large matrix products. The
    gradient options change that backward pass only, with the meaning they have in
    `jaxbptt.value_and_grad` (truncation, per-step clipping and its scope, memory policies
    `None`, `jaxbptt.Every(s)`, `jaxbptt.Sqrt()` and `jaxbptt.Binomial(slots)`); a cotangent of
    the final carry counts as an error of the last chunk.

    `step` may close over traced values (a hyperparameter, a learned initial carry): `jax.grad`
    with respect to them works as through `lax.scan`.

    Forward mode (`jax.jvp`, `jax.jacfwd`) is not supported through the reverse scan's custom VJP
    (it is through `engine="autodiff"`); `jax.hessian`, grad of grad and forward-over-reverse are.

    Args:
      step: `step(params, carry, x) -> (carry, y)`, pure; the carry keeps its structure, shapes and
        dtypes; `y` may be None.
      params: pytree of parameters.
      carry: the initial carry.
      xs: pytree whose leaves have time as the leading axis (length T), or None (then `length`
        gives T and the step receives `x=None`), as in `lax.scan`.
      truncation, remat, clip_norm, clip_scope, unroll, time_axis: as in `jaxbptt.value_and_grad`.
      reverse: run from the last step to the first, as in `lax.scan` (truncation chunks then
        count from the end).
      probe: None, or `jaxbptt.diagnostics_probe(T)`; the gradient with respect to it is the
        `jaxbptt.Diagnostics` of the reverse scan (per-step adjoint norm and clipped flag, indexed
        by time step).
      engine: as in `jaxbptt.value_and_grad`.
      length: the number of steps, needed when `xs` holds no arrays (None); if given with `xs`, it
        must equal their time axis.

    Returns:
      `(final_carry, ys)`, `ys` stacked along the time axis (`time_axis`).

    Raises:
      TypeError: `step` is not callable, or it changes the carry's structure, shapes or dtypes.
      ValueError: leaves of `xs` disagree on the time length, an option is out of range, or the
        chosen `engine` does not honour an option.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.elman(16), 1)
      >>> params = model.init(jax.random.key(0), 3)
      >>> xs = jnp.ones((20, 4, 3), jnp.float32)                      # (T, batch, input)
      >>> def loss(params):
      ...   final, ys = jb.unroll(model.step, params, model.initial_carry((4,)), xs)
      ...   return jnp.sum(ys ** 2) + jnp.sum(final ** 2)
      >>> grads = jax.grad(loss)(params)
      >>> grads["cell"]["W_hh"].shape
      (16, 16)
    """
    v.check_callable("step", step)
    check_options(truncation=truncation, remat=remat, clip_norm=clip_norm, clip_scope=clip_scope, unroll=unroll,
                  time_axis=time_axis)
    method = as_method(engine)
    used = _used(remat, probe=probe)
    refuse(method, used)
    call = calls.prepare(step, params, carry, xs, time_axis=time_axis, argnums=(0, 1, 2), truncation=truncation,
                         clip_norm=clip_norm, clip_scope=clip_scope, remat=remat, diagnostics=probe is not None,
                         unroll=unroll, length=length)
    if probe is not None:
        _check_probe(probe, call.length)
    if call.length == 0:
        final, ys = zero_length_outputs(step, params, call.carry, call.xs)
        return final, layout.from_time_major(ys, time_axis)
    flip = functools.partial(jax.tree.map, lambda a: jnp.flip(a, axis=0))
    if reverse:
        call, probe = call._replace(xs=flip(call.xs)), flip(probe)
    chosen, store = choose(call, used) if method == "auto" else (method, None)
    final, ys = chosen.unroll(call, probe, store)
    return final, layout.from_time_major(flip(ys) if reverse else ys, time_axis)

