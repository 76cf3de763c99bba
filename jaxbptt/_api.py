"""`value_and_grad`: the summed per-step loss and its BPTT gradients in one forward and one reverse
scan, the loss evaluated block by block so the outputs `ys` are never stored whole."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from . import _reverse
from . import _validate as v
from ._kernel import is_float
from ._path import check_engine, use_autodiff
from ._remat import make_plan
from ._types import LossFn, StepFn
from ._unroll import cast_like, check_options, poison_invalid, resolve_truncation, traced_options


def select_argnums(argnums, grads):
    return grads[argnums] if isinstance(argnums, int) else tuple(grads[a] for a in argnums)


def check_call(step, loss_fn, argnums, params, carry, xs, targets):
    """Shared trace-time checks of `value_and_grad` and its oracle; returns (T, carry)."""
    length = v.time_length("xs", xs)
    v.check_same_length("targets", targets, length)
    carry = v.check_carry(step, params, carry, xs)
    for a in v.check_argnums(argnums):
        v.check_differentiable(("params", "carry", "xs")[a], (params, carry, xs)[a])
    _, y = jax.eval_shape(step, params, carry, v.first_step(xs))
    v.check_loss(loss_fn, y, v.first_step(targets))
    return length, carry


def loss_dtype(step, loss_fn, params, carry, xs, targets):
    """The dtype of one step's loss, which the summed loss keeps (also for T = 0)."""
    _, y = jax.eval_shape(step, params, carry, v.first_step(xs))
    return jax.eval_shape(loss_fn, y, v.first_step(targets)).dtype


def zero_length_result(argnums, params, carry, xs, diagnostics, dtype=jnp.float32):
    """The exact answer for T = 0: zero loss, the initial carry, zero gradients."""
    zeros = jax.tree.map(jnp.zeros_like, (params, carry, xs))
    loss = jnp.zeros((), dtype)
    aux = (loss, carry)
    if diagnostics:
        aux += (_reverse.Diagnostics(jnp.zeros((0,), jnp.float32), jnp.zeros((0,), bool)),)
    return aux, select_argnums(argnums, zeros)


def value_and_grad(
    step: StepFn,
    loss_fn: LossFn,
    *,
    argnums=0,
    truncation=None,
    remat=None,
    clip_norm=None,
    diagnostics: bool = False,
    unroll: int = 1,
    check_finite: bool = False,
    axis_name=None,
    engine: str = "auto",
) -> Callable:
    """The sequence loss `L = sum_t loss_fn(y_t, target_t)` and its BPTT gradient.

    Equivalent to (but faster and lighter than)::

      def loss(params, carry, xs, targets):
        final, ys = lax.scan(lambda c, x: step(params, c, x), carry, xs)
        return jnp.sum(jax.vmap(loss_fn)(ys, targets)), final
      jax.value_and_grad(loss, argnums, has_aux=True)

    with the gradient options of `jaxbptt.unroll` (truncation, clipping, memory policy), which
    change the backward pass only. Time is the leading axis of every leaf of `xs` and `targets`.

    Args:
      step: `step(params, carry, x) -> (carry, y)`.
      loss_fn: `loss_fn(y_t, target_t) -> scalar`; masks or weights can travel in the targets.
      argnums: int or tuple of ints among 0 (params), 1 (carry), 2 (xs), as in `jax.value_and_grad`.
      truncation, remat, clip_norm, unroll: as in `jaxbptt.unroll`.
      diagnostics: also return `diag` (`jaxbptt.Diagnostics`: per-step adjoint norm and clipped flag).
      check_finite: the checked mode, for debugging. Every step's carry and output (forward), every
        carry cotangent and every block's parameter gradient (backward) is checked with
        `jax.experimental.checkify`; the first non-finite value raises `JaxRuntimeError` naming its
        time step (in the backward pass, the first met going back in time). The returned function
        then compiles itself and raises, so call it directly, not under `jit` or `vmap`. By default
        NaN and inf propagate, as in JAX: jaxbptt never masks them.
      axis_name: inside `jax.shard_map` (or `pmap`) over a split batch, the mapped axis over which
        the global norms of clipping and diagnostics are reduced, so that they equal the unsplit
        batch's (see `jaxbptt.data_parallel`).

    Returns:
      A function `(params, carry, xs, targets) -> ((loss, final_carry), grads)`, or
      `((loss, final_carry, diag), grads)` with `diagnostics=True`; `grads` is structured by
      `argnums` as in `jax.value_and_grad`.

    Raises:
      TypeError / ValueError: at trace time, for a non-callable step or loss, mismatched time axes
        of `xs` and `targets`, a step that changes its carry, a non-scalar loss, or options out of
        range; each message names the argument.

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
    """
    v.check_callable("step", step)
    v.check_callable("loss_fn", loss_fn)
    nums = v.check_argnums(argnums)
    check_options(truncation, remat, clip_norm, unroll)
    check_engine(engine, remat=remat, diagnostics=diagnostics, check_finite=check_finite, axis_name=axis_name)

    def value_and_grad_fn(params, carry, xs, targets):
        length, carry = check_call(step, loss_fn, argnums, params, carry, xs, targets)
        if length == 0:
            dtype = loss_dtype(step, loss_fn, params, carry, xs, targets)
            return zero_length_result(argnums, params, carry, xs, diagnostics, dtype)
        trunc, k, clip = traced_options(truncation, clip_norm, length)
        if use_autodiff(engine, step, length, _reverse.rows_per_step(carry), _reverse.carry_elements(carry),
                        remat=remat, truncation=truncation, clip_norm=clip_norm, diagnostics=diagnostics,
                        check_finite=check_finite, axis_name=axis_name):
            from ._reference import reference_value_and_grad  # it builds on this module

            oracle = reference_value_and_grad(step, loss_fn, argnums=argnums, truncation=truncation,
                                              clip_norm=clip_norm)
            aux, grads = oracle(params, carry, xs, targets)
            return aux, poison_invalid(grads, k, clip)
        plan = make_plan(length, remat, _reverse.rows_per_step(carry), _reverse.carry_elements(carry))
        kernel, consts = _reverse.setup(step, params, carry, xs)
        loss = (loss_fn, targets)
        final, value, saved = _reverse.forward(kernel, params, consts, carry, xs, plan, loss=loss, unroll=unroll,
                                               check_finite=check_finite)
        ct_final = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype if is_float(c) else jnp.float32), carry)
        dparams, dcarry, dxs, diag = _reverse.backward(
            kernel, params, consts, xs, saved, plan,
            ct_final=ct_final, loss=loss, trunc=resolve_truncation(trunc, k), clip_norm=clip,
            diagnostics=diagnostics, unroll=unroll, need_xs=2 in nums, check_finite=check_finite,
            axis_name=axis_name,
        )
        grads = (cast_like(dparams, params), cast_like(dcarry, carry), dxs)
        grads = poison_invalid(select_argnums(argnums, grads), k, clip)
        aux = (value, final) + ((diag,) if diagnostics else ())
        return aux, grads

    if not check_finite:
        return value_and_grad_fn
    checked = jax.jit(checkify.checkify(value_and_grad_fn, errors=checkify.user_checks))

    def checked_value_and_grad_fn(params, carry, xs, targets):
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

