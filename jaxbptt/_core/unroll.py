"""`unroll`: the forward scan, differentiable through the hand-written reverse scan."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._core import layout as _layout
from .._engine import reverse as _reverse
from .. import _validate as v
from .._engine.kernel import Step, as_engine_cotangent, is_float
from .._core.options import check_options, poison_invalid, resolve
from .._core.methods import check_engine, use_autodiff
from .._engine.remat import make_plan
from .._types import Carry, Params, PyTree, StepFn


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda g, p: g if not is_float(p) else g.astype(jnp.result_type(p)), tree, like)


def diagnostics_probe(length: int, dtype=None) -> _reverse.Diagnostics:
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
    return _reverse.Diagnostics(zeros, zeros)


def _check_probe(probe, length: int) -> None:
    if not isinstance(probe, _reverse.Diagnostics) or any(jnp.shape(a) != (length,) for a in probe):
        raise ValueError(
            f"probe must be jaxbptt.diagnostics_probe({length}) (a Diagnostics of two float arrays of shape "
            f"({length},), T being the length of xs); got {jax.tree.map(jnp.shape, probe)!r}."
        )


def hoist_closure(step, params, carry, x):
    """`(step, params)`, with the values `step` closes over that may carry a derivative moved into
    its parameters as `(params, hoisted)`, or unchanged when there are none.

    A custom VJP cannot differentiate with respect to values its function closes over, where
    `lax.scan` can (a hyperparameter, `resettable`'s initial carry, meta-learning); as explicit
    parameters they get their gradients from the engine like any other parameter. Under `jit`
    alone it cannot be known whether they will be differentiated, so traced values are always
    hoisted. A kernel-backed `Step` that declares its closure (`Step.closure`) is run as its
    `opened` step, which keeps the kernel; any other closed-over traced value is hoisted with
    `jax.closure_convert`, and the step then takes the generic kernel.
    """
    if isinstance(step, Step) and step.closure is not None and any(
        v.is_traced(a) for a in jax.tree.leaves(step.closure)
    ):
        step, params = step.opened, (params, step.closure)
    fn, hoisted = jax.closure_convert(lambda p, c, x_: step(p, c, x_), params, carry, x)
    if not hoisted:
        return step, params
    return (lambda ph, c, x_: fn(ph[0], c, x_, *ph[1])), (params, list(hoisted))


def _differentiable_unroll(step, plan):
    @jax.custom_vjp
    def run(params, carry, xs, opts, probe):
        del probe
        return lax.scan(lambda c, x: step(params, c, x), carry, xs, unroll=opts.unroll)

    def run_fwd(params, carry, xs, opts, probe):
        kernel, consts = _reverse.setup(step, params, carry, xs)
        final, ys, saved = _reverse.forward(kernel, params, consts, carry, xs, plan, opts)
        return (final, ys), (params, carry, xs, consts, saved, opts, probe)

    def run_bwd(residuals, cotangents):
        params, carry, xs, consts, saved, opts, probe = residuals
        ct_final, ct_ys = cotangents
        kernel, _ = _reverse.setup(step, params, carry, xs)
        dparams, dcarry, dxs, diag = _reverse.backward(
            kernel, params, consts, xs, saved, plan, opts, ct_final=as_engine_cotangent(ct_final, carry), ct_ys=ct_ys
        )
        dcarry = jax.tree.map(
            lambda g, c: g.astype(c.dtype) if is_float(c) else np.zeros(c.shape, jax.dtypes.float0), dcarry, carry
        )
        grads = poison_invalid((cast_like(dparams, params), dcarry, dxs), opts)
        if probe is not None:
            diag = jax.tree.map(lambda d, p: d.astype(p.dtype), diag, probe)
        return grads + (None, diag)  # the options get no gradient, as through the surrogate

    run.defvjp(run_fwd, run_bwd)
    return run


def unroll(
    step: StepFn,
    params: Params,
    carry: Carry,
    xs: PyTree,
    *,
    truncation=None,
    remat=None,
    clip_norm=None,
    reverse: bool = False,
    unroll: int = 1,
    probe=None,
    engine: str = "auto",
    time_axis: int = 0,
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
    gradient options change that backward pass only:

    - `truncation=k`: chunked truncated BPTT; the carry entering step t is treated as a constant
      when `t > 0 and t % k == 0`. `k` may be a traced integer (vmap over it).
    - `truncation=(k1, k2)`: Williams & Peng; the errors of each chunk of k1 steps go back through a
      window of k2 steps. A cotangent of the final carry counts as an error of the last chunk.
    - `clip_norm=c`: at every step the cotangent of the carry entering it is rescaled to global
      norm at most c before it flows further back.
    - `remat`: None keeps every step's residuals; an int s keeps every s-th carry and recomputes;
      `"sqrt"` uses s = ceil(sqrt(T)).

    `step` may close over traced values (a hyperparameter, a learned initial carry): `jax.grad`
    with respect to them works as through `lax.scan`.

    Forward mode (`jax.jvp`, `jax.jacfwd`) is not supported through this custom VJP; for it, use
    the plain `lax.scan` oracle (`jaxbptt.reference_unroll`).

    Args:
      step: `step(params, carry, x) -> (carry, y)`, pure; the carry keeps its structure, shapes and
        dtypes.
      params: pytree of parameters.
      carry: the initial carry.
      xs: pytree whose leaves have time as the leading axis (length T).
      truncation: None (exact BPTT), an int k >= 1, or a pair (k1, k2) with 1 <= k1 <= k2.
      remat: None, a positive int, or "sqrt".
      clip_norm: None or a float > 0.
      reverse: run from the last step to the first, as in `lax.scan` (truncation chunks then
        count from the end).
      unroll: steps per loop iteration in the inner scans, as in `lax.scan`.
      probe: None, or `jaxbptt.diagnostics_probe(T)`; the gradient with respect to it is the
        `jaxbptt.Diagnostics` of the reverse scan (per-step adjoint norm and clipped flag, indexed
        by time step).
      engine: which exact path differentiates the unroll: `"reverse"` (the reverse scan),
        `"autodiff"` (`jax.grad` through the surrogate `lax.scan` of `jaxbptt.reference_unroll`;
        no `remat` or `probe`) or `"auto"` (default: the reverse scan, except for built-in cells at
        sizes where a measured cost model finds autodiff faster and no option needs the engine).
      time_axis: 0 (time-major `xs`, the default) or 1 (batch-major `xs` shaped `(batch, T, ...)`,
        Flax's default; `ys` is then returned batch-major too). Equal to the time-major call on
        `swapaxes(0, 1)` data.

    Returns:
      `(final_carry, ys)`, `ys` stacked along the time axis (`time_axis`).

    Raises:
      TypeError: `step` is not callable, or it changes the carry's structure, shapes or dtypes.
      ValueError: leaves of `xs` disagree on the time length, or an option is out of range.

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
    check_options(truncation, remat, clip_norm, unroll)
    check_engine(engine, remat=remat, probe=probe)
    _layout.check_time_axis(time_axis)
    xs = _layout.time_major(xs, time_axis)
    length = v.time_length("xs", xs)
    carry = v.check_carry(step, params, carry, xs)
    if probe is not None:
        _check_probe(probe, length)
    if length == 0:
        final, ys = _reverse.zero_length_outputs(step, params, carry, xs)
        return final, _layout.from_time_major(ys, time_axis)
    flip = functools.partial(jax.tree.map, lambda a: jnp.flip(a, axis=0))
    if reverse:
        xs, probe = flip(xs), flip(probe)
    opts = resolve(length, truncation=truncation, clip_norm=clip_norm, remat=remat, diagnostics=probe is not None,
                   unroll=unroll, engine=engine)
    rows, elements = _reverse.rows_per_step(carry), _reverse.carry_elements(carry)
    if use_autodiff(step, length, rows, elements, opts):
        from .._core.reference import reference_unroll  # it builds on this module

        final, ys = reference_unroll(step, params, carry, xs, truncation=truncation, clip_norm=clip_norm)
        return final, _layout.from_time_major(flip(ys) if reverse else ys, time_axis)
    plan = make_plan(length, remat, rows, elements)
    step, params = hoist_closure(step, params, carry, jax.tree.map(lambda a: a[0], xs))
    final, ys = _differentiable_unroll(step, plan)(params, carry, xs, opts, probe)
    return final, _layout.from_time_major(flip(ys) if reverse else ys, time_axis)
