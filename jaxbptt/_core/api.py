"""`value_and_grad`: the summed per-step loss and its BPTT gradients in one forward and one reverse
scan, the loss evaluated block by block so the outputs `ys` are never stored whole."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from .._engine import reverse as _reverse
from .._core import layout as _layout
from .. import _validate as v
from .._engine.kernel import is_float
from .._core.options import check_options, poison_invalid, resolve
from .._core.methods import check_engine, use_autodiff
from .._engine.remat import make_plan
from .._types import LossFn, StepFn
from .._core.unroll import cast_like


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


def check_layout_options(has_aux, time_axis, clip_scope) -> None:
    """The layout and scope options (see `_layout`)."""
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool; got has_aux={has_aux!r}.")
    _layout.check_time_axis(time_axis)
    _layout.check_clip_scope(clip_scope)


def empty_aux(loss_fn, ys_struct, targets):
    """Zero-length `aux` for T = 0: the per-step aux structure with a leading axis of 0."""
    _, aux = jax.eval_shape(loss_fn, ys_struct, v.first_step(targets))
    return jax.tree.map(lambda s: jnp.zeros((0,) + s.shape, s.dtype), aux)


def stacked_loss(loss_fn, ys, targets):
    """`(sum_t loss_t, aux stacked over time)` of a `has_aux` loss."""
    losses, aux = jax.vmap(loss_fn)(ys, targets)
    return jnp.sum(losses), aux


def zero_length_result(argnums, params, carry, xs, diagnostics, dtype=jnp.float32, aux=None):
    """The exact answer for T = 0: zero loss, the initial carry, zero gradients."""
    zeros = jax.tree.map(jnp.zeros_like, (params, carry, xs))
    loss = jnp.zeros((), dtype)
    aux = (loss, carry) + (() if aux is None else (aux,))
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
    clip_scope: str = "batch",
    diagnostics: bool = False,
    has_aux: bool = False,
    time_axis: int = 0,
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
      clip_scope: what one per-step clipping norm covers: `"batch"` (default) the whole carry
        cotangent, so the threshold's meaning depends on the batch size; `"example"` each row of the
        carry's leading batch axis on its own (equal to `jax.vmap` of the unbatched call over
        examples). Diagnostics report the global norm in both scopes; with `"example"`, `clipped`
        is true at a step where any example was rescaled.
      diagnostics: also return `diag` (`jaxbptt.Diagnostics`: per-step adjoint norm and clipped flag).
      has_aux: `loss_fn(y_t, target_t) -> (loss_t, aux_t)`, `aux_t` any pytree of per-step metrics;
        they are returned stacked over time (leading axis T, whatever `time_axis`). The outputs
        `ys` are then kept whole for the loss (the default evaluates the loss block by block).
      time_axis: 0 when time is the leading axis of every leaf of `xs` and `targets` (time-major,
        as `lax.scan`); 1 for batch-major data shaped `(batch, T, ...)` (Flax's default). The result
        equals the time-major call on `swapaxes(0, 1)` data; input gradients come back batch-major.
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
      A function `(params, carry, xs, targets) -> ((loss, final_carry), grads)`, with `aux` then
      `diag` appended to the first tuple when `has_aux=True` and `diagnostics=True`:
      `((loss, final_carry, aux, diag), grads)`; `grads` is structured by `argnums` as in
      `jax.value_and_grad`. The function is jitted (called outside `jit` it still runs as one
      compiled program) and composes with `jit`, `vmap` and `grad`; with `check_finite=True` it
      runs its own compiled, checked program instead (see `check_finite`).

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

      Per-step metrics and batch-major data:

      >>> def loss_and_error(y, t):
      ...   return mse(y, t), {"abs_error": jnp.mean(jnp.abs(y - t))}
      >>> f = jb.value_and_grad(model.step, loss_and_error, has_aux=True, time_axis=1, clip_norm=1.0,
      ...                       clip_scope="example")
      >>> (loss, final, aux), grads = f(params, model.initial_carry((8,)), jnp.ones((8, 50, 2)), jnp.zeros((8, 50, 1)))
      >>> aux["abs_error"].shape
      (50,)
    """
    v.check_callable("step", step)
    v.check_callable("loss_fn", loss_fn)
    nums = v.check_argnums(argnums)
    check_options(truncation, remat, clip_norm, unroll)
    check_engine(engine, remat=remat, diagnostics=diagnostics, check_finite=check_finite, axis_name=axis_name)
    check_layout_options(has_aux, time_axis, clip_scope)
    scalar_loss = _layout.split_aux(loss_fn) if has_aux else loss_fn

    def value_and_grad_fn(params, carry, xs, targets):
        xs = _layout.time_major(xs, time_axis)
        targets = _layout.time_major(targets, time_axis, "targets")
        length, carry = check_call(step, scalar_loss, argnums, params, carry, xs, targets)
        if clip_norm is not None and clip_scope == "example":
            _layout.check_example_rows(carry)
        if length == 0:
            dtype = loss_dtype(step, scalar_loss, params, carry, xs, targets)
            aux = empty_aux(loss_fn, jax.eval_shape(step, params, carry, v.first_step(xs))[1], targets) if has_aux else None
            return zero_length_result(argnums, params, carry, xs, diagnostics, dtype, aux)
        opts = resolve(length, truncation=truncation, clip_norm=clip_norm, remat=remat, clip_scope=clip_scope,
                       diagnostics=diagnostics, unroll=unroll, check_finite=check_finite, axis_name=axis_name,
                       need_xs=2 in nums, engine=engine)
        rows, elements = _reverse.rows_per_step(carry), _reverse.carry_elements(carry)
        if use_autodiff(step, length, rows, elements, opts):
            from .._core.reference import reference_value_and_grad  # it builds on this module

            oracle = reference_value_and_grad(step, loss_fn, argnums=argnums, truncation=truncation,
                                              clip_norm=clip_norm, has_aux=has_aux)
            aux, grads = oracle(params, carry, xs, targets)
            return aux, poison_invalid(grads, opts)
        plan = make_plan(length, remat, rows, elements)
        kernel, consts = _reverse.setup(step, params, carry, xs)
        ct_ys, loss = None, (loss_fn, targets)
        if has_aux:  # the stacked aux needs every step's output at once
            final, ys, saved = _reverse.forward(kernel, params, consts, carry, xs, plan, opts)
            value, loss_vjp, aux = jax.vjp(lambda ys: stacked_loss(loss_fn, ys, targets), ys, has_aux=True)
            (ct_ys,), loss = loss_vjp(jnp.ones_like(value)), None
        else:
            final, value, saved = _reverse.forward(kernel, params, consts, carry, xs, plan, opts, loss=loss)
        ct_final = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype if is_float(c) else jnp.float32), carry)
        dparams, dcarry, dxs, diag = _reverse.backward(kernel, params, consts, xs, saved, plan, opts,
                                                       ct_final=ct_final, ct_ys=ct_ys, loss=loss)
        grads = (cast_like(dparams, params), cast_like(dcarry, carry), _layout.from_time_major(dxs, time_axis))
        grads = poison_invalid(select_argnums(argnums, grads), opts)
        aux = (value, final) + ((aux,) if has_aux else ()) + ((diag,) if diagnostics else ())
        return aux, grads

    if not check_finite:
        return jax.jit(value_and_grad_fn)  # one compiled program even when called outside jit
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

